"""Visual-attention decay of the original VLM (FRANK Fig. 2) and the prior FRANK takes from it."""

from __future__ import annotations

from analysis import attention
from analysis.analyses import Analysis, Figure, Knob, register
from merging import hub

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
MAX_IMAGES = 16  # a stable estimate of beta; more images only cost time


@register
class Attention(Analysis):
    name = "attention"
    title = "Attention decay"
    about = ("Share of attention that text positions pay to image tokens, per layer, with the fitted "
             "exponential decay a_l ≈ C·exp(−β·l) (FRANK Fig. 2). Upload your own images or use the samples.")
    knobs = (Knob("images", None, "your images (optional; default: the bundled samples)", kind="images",
                  cli="images"),
             Knob("question", attention.DEFAULT_QUESTION, "question asked with each image", kind="text"))
    figures = (Figure("attention_figure", "attention", "Attention decay", "plot-attention"),)

    def skip(self, job):
        folder = hub.resolve(job.triple[0])
        if not any((folder / f).is_file() for f in PROCESSOR_FILES):
            return f"{job.triple[0]} has no image processor ({' / '.join(PROCESSOR_FILES)})"
        return None

    def run(self, job, p):
        chosen = p["images"] or sorted(job.samples_dir.glob("*.png")) or None
        images = attention.load_images(chosen, limit=MAX_IMAGES)
        weights = job.weights_id(merged=False)  # FRANK's prior is measured on the original VLM
        key = {"weights": weights, "images": attention.images_key(images), "question": p["question"]}

        def compute():
            with job.source.model(job, merged=False, attentions=True) as (model, proc):
                return attention.attention_decay(model, proc, images, p["question"], limit=None,
                                                 device=job.device, progress=job.progress)

        return job.cached(self.name, key, compute)

    def summary(self, data, p):
        return (f"beta = {data['beta']:.3f} (fit R² = {data.get('r2', float('nan')):.2f}) on "
                f"{data['n_images']} image(s); use this beta for frank's prior")
