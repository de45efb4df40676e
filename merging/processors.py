"""A VLM's processor, also where transformers' own needs torchvision and torchvision is missing or
does not import (its PyPI build is made for CUDA torch: beside the CPU build it fails with
"operator torchvision::nms does not exist").

transformers 5 builds Qwen2-VL's and Qwen2.5-VL's processors with a video processor, which needs
torchvision, and Mistral3's (Pixtral's) processor module requires torchvision outright; their
image processors fall back to PIL versions that do not. For these families the lab builds an
image-only processor from the folder's own files (image processor config, tokenizer, chat
template): the same image tokens and pixel values for images and text, no video. Any other
family whose processor needs a missing package gets a one-line error naming the package.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from merging.errors import LabError
from merging.pixtral_processor import ImageOnlyPixtralProcessor

PIXTRAL_FILES = ("processor_config.json", "preprocessor_config.json")


def torchvision_problem() -> str | None:
    """None when torchvision imports; else why not ("not installed" or its import error)."""
    try:
        importlib.import_module("torchvision")
    except ModuleNotFoundError:
        return "not installed"
    except Exception as e:  # a build made for another torch fails inside its own import
        return f"installed but does not import ({type(e).__name__}: {first_line(e)})"
    return None


def first_line(e: BaseException) -> str:
    """The first non-empty line of an error: transformers' backend errors begin with a newline."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:200]


def load_processor(path: Path, model_type: str, trust_remote_code: bool = False):
    """The folder's processor (AutoProcessor), or the lab's image-only one where AutoProcessor
    fails for want of torchvision; LabError naming what is missing otherwise."""
    # lazy: transformers' processor classes, imported only when a model is loaded.
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        first = first_line(e)
        tv = torchvision_problem()
        if tv is None:
            raise LabError(f"could not load the model in {path}: no usable processor ({type(e).__name__}: {first})") from None
        build = IMAGE_ONLY.get(model_type)
        if build is not None:
            return build(path)
        raise LabError(f"{model_type}'s processor needs torchvision, which is {tv}: pip install torchvision "
                       f"(the build made for your torch) ({type(e).__name__}: {first})") from None


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

        def to_dict(self):
            d = super().to_dict()
            d["processor_class"] = base_name  # what a folder saved from it names, for transformers to load
            return d

    ip, tok, template = _parts(path)
    return ImageOnly(image_processor=ip, tokenizer=tok, chat_template=template)


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
