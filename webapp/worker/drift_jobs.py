"""The worker's DRIFT job (worker side): the short fine-tune of the served VLM with the reasoner's prior,
written under the cache by its settings' and data's key, reused when that folder exists, and loaded
beside the served model for chat and Evaluate (JobContext.drift_loaded)."""

from __future__ import annotations

from pathlib import Path

from merging.drift import DriftResult, drift_settings
from merging.finetune import run_drift, run_identity, training_data
from merging.hub import resolve
from webapp.protocol import recipe_key


def run_drift_job(ctx, args: dict) -> dict:
    spec = {"vlm": resolve(args["vlm"]), "reasoner": args["reasoner"], "drift": drift_settings(args.get("drift")),
            "data_by_name": bool(args.get("data_by_name")), "data_name": args.get("data_name")}
    data = training_data(spec)  # read and checked before anything loads; its hash names the run
    out_dir = Path(ctx.cache_dir or ".", "drift", recipe_key(run_identity(spec, data))).resolve()
    progress = ctx.progress(yields=True)
    if (out_dir / "config.json").is_file():  # the same settings ran before: its folder as it is
        result = DriftResult(folder=str(out_dir), vlm=str(spec["vlm"]), reasoner=spec["reasoner"],
                             settings=spec["drift"], reused=True)
    else:
        ctx.forget_drift()  # free the previous result's memory before training
        result = run_drift(spec, out_dir, ctx.device, progress, ctx.flag, data)
    ctx.drift_loaded(result.folder, progress)
    return {"result": result, "device": ctx.device}
