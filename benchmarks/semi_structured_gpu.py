"""2:4 semi-structured Linear layers of a ViT on the GPU against dense: inference and training-step times.

What the deploy issue asks of a lent GPU: a timm ViT's Linear weights pruned to 2:4 along the input dimension
(``lp.functional.nm_mask``, what ``GradualMagnitudePruning(pattern="2:4")`` trains), converted by
``lp.to_semi_structured``, timed against the same dense weights -- each Linear shape of the ViT alone (the
tokens of a batch as rows) and the whole model's forward -- in float16 and bfloat16, CUDA-synchronised,
medians.
A training step is forward + backward of the Linear with a dense weight whose gradient is masked (what the
callback trains: dense kernels) against the semi-structured weight's forward + backward to the input, where
PyTorch supports it (reported as "unsupported: ..." otherwise).

Run: ``python benchmarks/semi_structured_gpu.py`` (also called by ``benchmarks/gpu_check.py``). Without a CUDA
GPU of compute capability >= 8.0 it says so and exits 0. It takes about a minute on an H100-class GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"


def _available() -> str | None:
    """Why this machine cannot run the benchmark (None: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    capability = torch.cuda.get_device_capability()
    if tuple(capability) < (8, 0):
        return f"{torch.cuda.get_device_name()} has compute capability {capability}; 2:4 needs >= 8.0"
    return None


def _time_ms(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _two_four(weight: torch.Tensor) -> torch.Tensor:
    from lightning_prune.functional import nm_mask

    return weight * nm_mask(weight.abs(), 2, 4, dim=1).to(weight.dtype)


def _linear_row(in_features: int, out_features: int, tokens: int, dtype: torch.dtype, repeats: int) -> dict:
    import lightning_prune as lp

    dense = nn.Linear(in_features, out_features).to("cuda", dtype)
    with torch.no_grad():
        dense.weight.copy_(_two_four(dense.weight))
    sparse = nn.Linear(in_features, out_features).to("cuda", dtype)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
    row = {"layer": f"{in_features}->{out_features}", "rows": tokens,
           "dtype": str(dtype).removeprefix("torch.")}
    try:
        row["backend"] = lp.to_semi_structured(nn.Sequential(sparse)).get("0", "?")
    except Exception as error:  # noqa: BLE001 - reported in the table, the other rows still run
        row["error"] = f"{type(error).__name__}: {error}"[:160]
        return row
    with torch.no_grad():
        row["max_rel_error"] = float((sparse(x) - dense(x)).abs().max() / dense(x).abs().max())
        row["forward_dense_ms"] = _time_ms(lambda: dense(x), repeats)
        row["forward_2:4_ms"] = _time_ms(lambda: sparse(x), repeats)
    xg = x.clone().requires_grad_(True)
    mask = dense.weight != 0

    def dense_step():
        dense(xg).sum().backward()
        dense.weight.grad.mul_(mask)
        dense.weight.grad = None
        xg.grad = None

    def sparse_step():
        sparse(xg).sum().backward()
        xg.grad = None

    row["step_dense_ms"] = _time_ms(dense_step, repeats)
    try:
        row["step_2:4_ms"] = _time_ms(sparse_step, repeats)
    except Exception as error:  # noqa: BLE001
        row["step_2:4_ms"] = f"unsupported: {type(error).__name__}"
    return row


def linear_rows(model_name: str, batch: int, dtype: torch.dtype, repeats: int) -> list[dict]:
    """Every distinct Linear shape of ``model_name``: dense vs 2:4 semi-structured, forward and step."""
    import timm

    model = timm.create_model(model_name, pretrained=False)
    tokens = batch * (model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1))
    shapes = sorted({(m.in_features, m.out_features) for m in model.modules()
                     if isinstance(m, nn.Linear) and m.out_features % 64 == 0 and m.in_features % 64 == 0})
    return [_linear_row(i, o, tokens, dtype, repeats) for i, o in shapes]


def model_row(model_name: str, batch: int, dtype: torch.dtype, repeats: int) -> dict:
    """The whole ViT's forward: dense (2:4 weights stored dense) vs its Linear layers semi-structured."""
    import timm

    import lightning_prune as lp

    model = timm.create_model(model_name, pretrained=False).to("cuda", dtype).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(_two_four(module.weight))
    x = torch.randn(batch, 3, *model.patch_embed.img_size, device="cuda", dtype=dtype)
    row = {"model": model_name, "batch": batch, "dtype": str(dtype).removeprefix("torch.")}
    with torch.no_grad():
        reference = model(x)
        row["forward_dense_ms"] = _time_ms(lambda: model(x), repeats)
        try:
            converted = lp.to_semi_structured(model)
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {error}"[:160]
            return row
        row["converted_linears"] = len(converted)
        row["max_rel_error"] = float((model(x) - reference).abs().max() / reference.abs().max())
        row["forward_2:4_ms"] = _time_ms(lambda: model(x), repeats)
    return row


def run(model_name: str = "vit_base_patch16_224", batch: int = 64, repeats: int = 20) -> dict:
    why_not = _available()
    if why_not:
        return {"skipped": why_not}
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": model_name,
              "batch": batch, "repeats": repeats, "linears": [], "models": []}
    for dtype in (torch.float16, torch.bfloat16):
        result["linears"] += linear_rows(model_name, batch, dtype, repeats)
        for b in (1, batch):
            result["models"].append(model_row(model_name, b, dtype, repeats))
    return result


def _ratio(row: dict, key: str) -> str:
    dense, sparse = row.get(f"{key}_dense_ms"), row.get(f"{key}_2:4_ms")
    if not isinstance(dense, float) or not isinstance(sparse, float):
        return str(sparse if sparse is not None else row.get("error", "-"))
    return f"{dense:.3f} / {sparse:.3f} ms ({sparse / dense:.2f}x)"


def render(result: dict) -> str:
    if "skipped" in result:
        return f"2:4 semi-structured benchmark skipped: {result['skipped']}.\n"
    lines = [f"{result['device']}, torch {result['torch']}, {result['model']}, CUDA-synchronised medians of"
             f" {result['repeats']}; dense / 2:4 (ratio).", "",
             "| Linear | rows | dtype | backend | forward | step (fwd + bwd) | max rel. error |",
             "|---|---:|---|---|---:|---:|---:|"]
    for row in result["linears"]:
        error = row.get("max_rel_error", float("nan"))
        lines.append(f"| {row['layer']} | {row['rows']} | {row['dtype']} | {row.get('backend', '-')} |"
                     f" {_ratio(row, 'forward')} | {_ratio(row, 'step')} | {error:.1e} |")
    lines += ["", "| model | batch | dtype | converted Linears | forward | max rel. error |",
              "|---|---:|---|---:|---:|---:|"]
    for row in result["models"]:
        error = row.get("max_rel_error", float("nan"))
        converted = row.get("converted_linears", "-")
        lines.append(f"| {row['model']} | {row['batch']} | {row['dtype']} | {converted} |"
                     f" {_ratio(row, 'forward')} | {error:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "semi_structured_gpu")
    args = parser.parse_args(argv)
    result = run(args.model, args.batch, args.repeats)
    text = render(result)
    print(text)
    if "skipped" not in result:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
