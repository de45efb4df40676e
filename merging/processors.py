"""A VLM's processor, also where transformers' own needs torchvision and torchvision is missing or
does not import (its PyPI build is made for CUDA torch: beside the CPU build it fails with
"operator torchvision::nms does not exist").

transformers 5 builds Qwen2-VL's and Qwen2.5-VL's processors with a video processor, which needs
torchvision, and Mistral3's (Pixtral's) processor module requires torchvision outright; their
image processors fall back to PIL versions that do not. For these families the lab builds an
image-only processor from the folder's own files (image processor config, tokenizer, chat
template): the same image tokens and pixel values for images and text, no video. Any other
family whose processor needs a missing package gets a one-line error naming the package, and an
installed torchvision that does not import is named before transformers trips over it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path

from merging.errors import LabError
from merging.pixtral_processor import ImageOnlyPixtralProcessor

PIXTRAL_FILES = ("processor_config.json", "preprocessor_config.json")
# transformers' backend names -> pip's package names, where they differ
PIP_NAMES = {"pil": "Pillow", "vision": "Pillow", "pytorch": "torch", "sklearn": "scikit-learn"}


def torchvision_problem() -> str | None:
    """None when torchvision is not installed or imports; else its import error, in one line."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        importlib.import_module("torchvision")
    except Exception as e:  # a build made for another torch fails inside its own import
        return f"{type(e).__name__}: {first_line(e)}"
    return None


def check_torchvision() -> None:
    """LabError when torchvision is installed but does not import: transformers then imports it
    for every model, text-only ones too, and fails naming only the class it was loading."""
    problem = torchvision_problem()
    if problem:
        raise LabError(f"torchvision is installed but does not import ({problem}), and transformers imports it for "
                       "every model: pip uninstall torchvision, or install the build made for your torch")


def first_line(e: BaseException) -> str:
    """The first non-empty line of an error: transformers' backend errors begin with a newline."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:200]


def missing_package(e: BaseException) -> tuple[str, str | None] | None:
    """(pip name, the class that needs it or None) of the package an error (or its cause) says is
    missing: a ModuleNotFoundError's module, or the library of transformers' "X requires the Y library"."""
    while e is not None:
        if isinstance(e, ModuleNotFoundError) and e.name:
            name = e.name.split(".")[0]
            return PIP_NAMES.get(name.lower(), name), None
        found = re.search(r"(\w+) requires the (\S+) library", str(e))
        if isinstance(e, ImportError) and found:
            return PIP_NAMES.get(found[2].lower(), found[2].lower()), found[1]
        e = e.__cause__ or e.__context__
    return None


def load_processor(path: Path, model_type: str, trust_remote_code: bool = False):
    """The folder's processor (AutoProcessor), or the lab's image-only one where the family's own
    cannot load for want of torchvision; a one-line LabError naming what is missing otherwise."""
    # lazy: transformers' processor classes, imported only when a model is loaded.
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        error = e
    check_torchvision()
    if model_type in IMAGE_ONLY and importlib.util.find_spec("torchvision") is None:
        # Without torchvision these families' own processors never load (a video processor, or
        # Pixtral's whole module, needs it), whichever error came first; the image-only one does.
        try:
            return IMAGE_ONLY[model_type](path)
        except Exception as e:
            raise LabError(f"could not load the model in {path}: no usable processor (the lab's image-only one: "
                           f"{type(e).__name__}: {first_line(e)})") from None
    missing = missing_package(error)
    if missing is None:  # not a missing package: a bad file, say; the error itself says which
        raise LabError(f"could not load the model in {path}: no usable processor "
                       f"({type(error).__name__}: {first_line(error)})") from None
    package, needer = missing
    who = f" ({needer} requires it)" if needer else ""
    hint = " (the build made for your torch)" if package == "torchvision" else ""
    raise LabError(f"{model_type or 'this model'}'s processor needs {package}{who}, which is not installed: "
                   f"pip install {package}{hint}")


def _chat_template(path: Path, tok) -> str | None:
    """The processor's chat template as the folder ships it (chat_template.jinja or .json, or in
    processor_config.json), else the tokenizer's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json"):
        f = path / name
        if f.is_file():
            template = json.loads(f.read_text()).get("chat_template")
            if template:
                return template
    return getattr(tok, "chat_template", None)


def _parts(path: Path):
    # lazy: transformers' processor classes, imported only when a model is loaded.
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return AutoImageProcessor.from_pretrained(path), tok, _chat_template(path, tok)


def _qwen_vl(path: Path, base_name: str):
    import transformers  # lazy: transformers' processor classes, imported only when a model is loaded
    from transformers.processing_utils import ProcessorMixin  # lazy: as above

    base = getattr(transformers, base_name)

    class ImageOnly(base):
        """The family's processor without its video processor: __init__'s signature names the
        parts ProcessorMixin checks and saves, so leaving video_processor out of it drops the part."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def save_pretrained(self, folder, **kwargs):
            """The files as the family's checkpoints ship them: tokenizer, chat template, and the image
            processor's own preprocessor_config.json naming the family's processor class, which the
            family's video processor also reads (ProcessorMixin would write the image processor into
            processor_config.json instead, where the video processor finds nothing and fails)."""
            _save_as_shipped(self, Path(folder), {"processor_class": base_name})

    ip, tok, template = _parts(path)
    return ImageOnly(image_processor=ip, tokenizer=tok, chat_template=template)


def _save_as_shipped(proc, folder: Path, settings: dict) -> None:
    """A processor's files as a family's checkpoint ships them: the tokenizer's, the image processor's
    preprocessor_config.json with `settings` added, and chat_template.jinja."""
    folder.mkdir(parents=True, exist_ok=True)
    proc.tokenizer.save_pretrained(folder)
    proc.image_processor.save_pretrained(folder)
    config = folder / "preprocessor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **settings}, indent=2) + "\n")
    if proc.chat_template:
        (folder / "chat_template.jinja").write_text(proc.chat_template)


def _pixtral(path: Path):
    ip, tok, template = _parts(path)
    settings = {}
    for name in PIXTRAL_FILES:
        if (path / name).is_file():
            settings = {**json.loads((path / name).read_text()), **settings}
    return ImageOnlyPixtralProcessor(ip, tok, template, settings)


IMAGE_ONLY = {
    "qwen2_vl": lambda p: _qwen_vl(p, "Qwen2VLProcessor"),
    "qwen2_5_vl": lambda p: _qwen_vl(p, "Qwen2_5_VLProcessor"),
    "mistral3": _pixtral,
}
