"""`frism` (FRISM, arXiv 2601.21187; no public code). Scope: one decoder layer at a time.

Per 2-D matrix of a decoder layer, the reasoner's task vector tau_r = W_r - W_0 is cut along its
right singular vectors into gated pieces (merging/subspace_gates.py): the top `rank` directions in
`groups` contiguous groups, and the tail (every other direction, one gate of its own when rank is
below the matrix's). The merge is

  W = W_v + sum_i g_i U_i S_i V_i^T + g_tail (tau_r - U S V^T)

with gates g in (0, 1) learned before any tensor is merged (`prepare`, merging/gate_learning.py):
the VLM's own greedy answers to perception prompts (the bundled family's scenes, or the recipe's
`prompts:` JSONL for any other VLM) are the targets of a KL term that keeps the
merged model's next-token distributions close to the VLM's, and `beta` rewards the share of tau_r's
spectral mass injected. `steps` 0 learns nothing: every gate 0.5 (task arithmetic at alpha 0.5).
1-D tensors, and tensors outside the decoder layers, keep the VLM's. The learned gates go into the
merge report (merge_report.json beside a merged folder; InPlaceMerger.apply's return value).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict

import torch

from merging import gate_learning, gate_memory, subspace_gates
from merging.compat import check_triple
from merging.merge_plan import plan_groups
from merging.methods import MergeMethod, Paper, Param, TensorSet, layer_key, register


def _short(canonical: str) -> str:
    """layers.3.mlp.up_proj.weight -> mlp.up_proj"""
    return canonical.split(".", 2)[2].removesuffix(".weight")


@register
class Frism(MergeMethod):
    name = "frism"
    needs_base = True
    scope = "layer"
    learns_from_prompts = True
    description = ("Gate each singular subspace of the reasoner's task vector; the gates are learned without "
                   "labels to keep the VLM's answers on perception prompts while injecting the most.")
    params = (
        Param("rank", 16, 1, 8192, "top singular directions of each task vector gated in groups; the rest "
              "share one tail gate", kind=int, per_layer=False),
        Param("groups", 4, 1, 64, "gates over the top directions (rank / groups directions each)", kind=int,
              per_layer=False),
        Param("beta", 0.2, 0.0, 10.0, "weight of the reward for injected spectral mass against the KL to the "
              "VLM on perception prompts", per_layer=False),
        Param("steps", 20, 0, 1000, "Adam steps learning the gates (0: every gate 0.5, nothing learned)",
              kind=int, per_layer=False),
        Param("examples", 32, 1, 1024, "perception prompts the VLM answers for the KL term", kind=int,
              per_layer=False),
    )
    paper = Paper("FRISM", "FRISM, 2026", "https://arxiv.org/abs/2601.21187")

    def grid(self, num_layers: int) -> list[dict]:
        return [{"beta": b} for b in (0.01, 0.05, 1.0)]

    def prepare(self, recipe, ctx, progress=None, cancel=None) -> None:
        """Learn the gates of every matrix the recipe merges (or take them from the gate cache)."""
        report = check_triple(recipe.vlm, recipe.reasoner, recipe.base)
        groups, _ = plan_groups(recipe, self, report.layouts)
        names = gate_memory.gated_matrices(recipe.vlm, report.layouts["vlm"].lm, [c for g in groups for c in g.names])
        knobs = {p.name: p.typed(recipe.knobs()[p.name]) for p in self.params}
        setup = gate_learning.Setup({"vlm": recipe.vlm, "reasoner": recipe.reasoner, "base": recipe.base},
                                    report.layouts, names, knobs, recipe.seed, ctx.device,
                                    ctx.fingerprints or report.fingerprints, getattr(recipe, "prompts", None))
        learned = gate_learning.learn(setup, progress, cancel, ctx.release)
        ctx.diagnostics.methods[self.name] = {"learned": asdict(learned), "layers": {}}

    def merge_layer(self, layer, sets: dict[str, TensorSet], p: dict, ctx) -> dict[str, torch.Tensor]:
        if layer is None:
            return {}
        state = ctx.diagnostics.methods.get(self.name)
        if state is None:
            raise RuntimeError("frism: merge_layer before prepare (the gates are learned there)")
        learned = state["learned"]
        out, shown, shares = {}, {}, {}
        for name, t in sets.items():
            if t.vlm.dim() != 2:
                continue
            tau = (t.reasoner - t.base).float()
            pieces = subspace_gates.pieces(tau, p["rank"], p["groups"])
            gates = learned["gates"].get(name) or [gate_learning.INIT] * pieces.gates
            if len(gates) != pieces.gates:
                raise RuntimeError(f"frism: {len(gates)} gates for the {pieces.gates} pieces of {name}")
            shown[_short(name)] = [float(g) for g in gates]
            total = sum(pieces.energy)
            shares[_short(name)] = [e / total if total > 0 else 0.0 for e in pieces.energy]
            if all(g == 0 for g in gates):
                continue  # adds nothing: the VLM's own bits
            out[name] = t.vlm + subspace_gates.delta(tau, pieces, gates).to(t.vlm.dtype)
        state["layers"][layer] = shown
        state.setdefault("shares", {})[layer] = shares
        return out

    # ---- diagnostics: ctx.diagnostics.methods[name] is {"learned": a gate_learning.Learned as a dict,
    # "layers": {layer: {matrix: gates}}, "shares": {layer: {matrix: each piece's share of ||tau_r||_F^2}}}
    def summarize_diagnostics(self, extra: dict) -> tuple[dict, list[str]]:
        if self.name not in extra:
            return {}, []
        st = extra[self.name]
        ln = gate_learning.Learned(**st["learned"])
        gates = {layer_key(k): v for k, v in sorted(st["layers"].items())}
        flat = [g for m in gates.values() for gs in m.values() for g in gs]
        shares = {layer_key(k): v for k, v in sorted(st.get("shares", {}).items())}
        out = {"gates": gates, "spectral_share": shares, "mean_gate": statistics.fmean(flat) if flat else None,
               "mean_gate_per_layer": {k: statistics.fmean([g for gs in m.values() for g in gs])
                                       for k, m in gates.items() if m},
               "learned": bool(ln.gates), "kl_start": ln.kl_start, "kl_end": ln.kl_end, "injected": ln.injected,
               "losses": ln.losses, "seconds": ln.seconds, "examples": ln.examples, "cached": ln.cached}
        warn = [] if ln.gates else [f"{self.name} learned no gates (steps 0): every gate is {gate_learning.INIT}"]
        return {self.name: out}, warn

    def selection_details(self, extra: dict) -> str:
        d, _ = self.summarize_diagnostics(extra)
        f = d.get(self.name)
        if not f or f["mean_gate"] is None:
            return ""
        kl = f" (KL {f['kl_start']:.3f} -> {f['kl_end']:.3f})" if f["learned"] else ""
        return f"mean gate {f['mean_gate']:.2f}{kl}"

    def report_lines(self, diagnostics: dict) -> list[str]:
        f = diagnostics.get(self.name)
        if not f or f["mean_gate"] is None:
            return []
        if not f["learned"]:
            return [f"{self.name}: every gate {f['mean_gate']:.2f} (nothing learned)"]
        how = "taken from the gate cache" if f["cached"] else f"learned in {f['seconds']:.1f} s"
        return [f"{self.name} gates {how} ({len(f['losses'])} steps, {f['examples']} prompts): mean gate "
                f"{f['mean_gate']:.2f}, KL to the VLM {f['kl_start']:.4f} -> {f['kl_end']:.4f}, "
                f"injected {f['injected']:.1%} of the reasoner's spectral mass"]

    def diagnostic_grid(self, diagnostics: dict) -> dict | None:
        """Every gate, layer by matrix and piece (the top directions in groups, then the tail)."""
        f = diagnostics.get(self.name)
        if not f or not f.get("gates"):
            return None
        layers = list(f["gates"])
        cols = []
        for m in f["gates"].values():
            for mat, gs in m.items():
                cols += [(mat, i) for i in range(len(gs)) if (mat, i) not in cols]
        def label(mat, i, n):  # short: the app's column is narrow (the hover text names it in full)
            short = mat.split(".")[-1].removesuffix("_proj")
            return f"{short}·{'t' if i == n - 1 else i + 1}"
        width = {mat: max(len(m.get(mat, [])) for m in f["gates"].values()) for mat, _ in cols}
        z, hover = [], []
        for layer in layers:
            gates, shares = f["gates"][layer], f.get("spectral_share", {}).get(layer, {})
            z.append([gates[mat][i] if mat in gates and i < len(gates[mat]) else None for mat, i in cols])
            hover.append([f"layer {layer}, {mat} {'tail' if i == width[mat] - 1 else f'top group {i + 1}'}: "
                          f"gate {gates[mat][i]:.2f}, "
                          f"{shares.get(mat, [0] * (i + 1))[i]:.0%} of tau_r's energy"
                          if mat in gates and i < len(gates[mat]) else "" for mat, i in cols])
        return {"title": f"{self.name} gates: matrix·subspace (t: tail); 0 VLM, 1 reasoner",
                "rows": [f"layer {k}" for k in layers], "cols": [label(m, i, width[m]) for m, i in cols],
                "z": z, "hover": hover, "zmin": 0.0, "zmax": 1.0}

    def layer_note(self, diagnostics: dict, layer: str) -> str:
        m = diagnostics.get(self.name, {}).get("mean_gate_per_layer", {})
        return f"; {self.name} mean gate {m[layer]:.2f}" if layer in m else ""
