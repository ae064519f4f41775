"""One consolidated checkpoint: every part in vsal's key layout, LoRA merged, in safetensors.

`convert_release_files` streams the six released files into it without ever building the model:
a first pass over the files' metadata (shapes and dtypes only, on the meta device) plans the
safetensors header and checks every shape, a second pass copies the tensors one at a time. The
file is written under a temporary name and renamed when complete.

The same two passes, limited to the keys a caller wants (`keep`), let an export read the released
files part by part with no consolidated file at all (vsal.export.weights.release_stream).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from vsal.export.config import ModelConfig
from vsal.export.weights.checkpoints import _LORA, CheckpointError, LoadReport, ReleaseLoader, _derived
from vsal.export.weights.lora import merge_lora
from vsal.export.weights.release_files import RELEASE_SOURCES, ReleaseSource, check_release_dir, read_source
from vsal.runtime.package_lock import replacing

FORMAT = "vsal-consolidated"
FORMAT_VERSION = "1"
_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _meta_model(config: ModelConfig):
    from vsal.export import build_model

    with torch.device("meta"):  # names and shapes, no memory: works for 13b on a small machine
        return build_model(config)


Keep = Callable[[str], bool]  # vsal key -> whether a pass wants it


def _read_delta(
    path: Path,
    source: ReleaseSource,
    config: ModelConfig,
    loader: ReleaseLoader,
    meta: bool,
    keep: Keep | None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The delta's tensors by vsal key, and its LoRA factors by the vsal weight they update
    ({"A": .., "B": ..}); problems go to the loader. With `keep`, only the keys it wants (and
    nothing is reported of the rest)."""
    report = loader.report
    delta: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for _, release_key, tensor in read_source(path, source, config, meta=meta):
        m = _LORA.match(release_key)
        if m:
            dest = loader.target(m["base"] + ".weight")
            if keep is not None and (dest is None or not keep(dest.key)):
                continue
            if dest is None or dest.key not in loader.params:
                report.unexpected.append(release_key)
            else:
                lora.setdefault(dest.key, {})[m["ab"]] = tensor
            continue
        dest = None if loader._ignored(release_key) else loader.target(release_key)
        if keep is not None and (dest is None or not keep(dest.key)):
            continue
        if dest is None or dest.key not in loader.params or dest.third is not None:
            (report.ignored if loader._ignored(release_key) else report.unexpected).append(release_key)
            continue
        delta[dest.key] = tensor
    return delta, lora


def _consolidate(
    folder: Path, config: ModelConfig, loader: ReleaseLoader, meta: bool, keep: Keep | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (vsal key, tensor) once per filled key, in a fixed order; problems go to the loader.

    The delta (last file) is read first and held: the release loads it over everything else
    (strict=False), so its tensors win, and its LoRA factors must be at hand when the base
    weights stream past. With `keep` (one part's keys), no other key is yielded and no other
    tensor of the base files is read.
    """
    paths = check_release_dir(folder)
    report, scale = loader.report, config.lora.scale
    *bases, (delta_source, delta_path) = list(zip(RELEASE_SOURCES, paths, strict=True))
    delta, lora = _read_delta(delta_path, delta_source, config, loader, meta, keep)

    def wanted(release_key: str | None) -> bool:  # decided before a tensor's data is read
        if keep is None:
            return True
        if release_key is None or loader._ignored(release_key):
            return False
        dest = loader.target(release_key)
        return dest is not None and keep(dest.key)

    thirds: dict[str, dict[int, torch.Tensor]] = {}
    for source, path in bases:
        for key, release_key, tensor in read_source(path, source, config, wanted, meta):
            if release_key is None or loader._ignored(release_key):
                report.ignored.append(f"{source.name}:{key}")
                continue
            dest = loader.target(release_key)
            if dest is None or dest.key not in loader.params:
                report.unexpected.append(f"{source.name}:{key}")
                continue
            if dest.key in delta:
                continue  # the delta's copy wins, as in the release
            if dest.third is not None:  # EVA's q_bias / v_bias -> one fused qkv bias, k third zero
                parts = thirds.setdefault(dest.key, {})
                parts[dest.third] = tensor
                if len(parts) == 2:
                    q, v = parts[0], parts[2]
                    yield dest.key, torch.cat([q, torch.zeros_like(q), v])
                continue
            pair = lora.pop(dest.key, None)
            if pair is not None:
                tensor = _merged(dest.key, tensor, pair, scale, loader)
            yield dest.key, tensor
    for dest in lora:
        loader._errors.append(f"LoRA for {dest} arrived but its base weight was never loaded")
    yield from delta.items()


def _merged(
    key: str, tensor: torch.Tensor, pair: dict[str, torch.Tensor], scale: float, loader: ReleaseLoader
) -> torch.Tensor:
    """The base weight `key` with its LoRA pair merged; an incomplete or misfit pair is an error
    in the loader and leaves the weight as it is."""
    if set(pair) != {"A", "B"}:
        loader._errors.append(f"LoRA for {key} has only lora_{''.join(pair)}")
        return tensor
    try:
        merged = merge_lora(tensor, pair["A"], pair["B"], scale)
    except ValueError as exc:
        loader._errors.append(f"LoRA for {key}: {exc}")
        return tensor
    loader.report.lora_merged.append(key)
    return merged


Plan = list[tuple[str, torch.dtype, tuple[int, ...]]]  # (vsal key, dtype, shape) in writing order


def plan_release_files(
    folder: str | Path, config: ModelConfig, keep: Keep | None = None, model=None
) -> tuple[Plan, LoadReport]:
    """Metadata only: every key the release files fill (those `keep` wants), with its dtype and
    shape; CheckpointError lists every shape that differs from the model's, every LoRA problem and
    every key missing. `model`: a VideoSalmonn of `config` on the meta device, when one is at hand."""
    folder = Path(folder)
    model = _meta_model(config) if model is None else model
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not _derived(k)}
    if keep is not None:
        shapes = {k: v for k, v in shapes.items() if keep(k)}
    planner = ReleaseLoader(model)
    plan: Plan = []
    planned: set[str] = set()
    for key, tensor in _consolidate(folder, config, planner, meta=True, keep=keep):
        if key in planned:
            continue
        planned.add(key)
        if tuple(tensor.shape) != shapes[key]:
            planner._errors.append(
                f"{key}: checkpoint shape {tuple(tensor.shape)}, model expects {shapes[key]}"
            )
        plan.append((key, tensor.dtype, tuple(tensor.shape)))
    report = planner.report
    report.loaded = [k for k, _, _ in plan]
    report.missing = sorted(set(shapes) - set(report.loaded))
    if planner._errors:
        raise CheckpointError(
            f"{len(planner._errors)} checkpoint problem(s):\n  " + "\n  ".join(planner._errors)
        )
    if report.missing:
        raise CheckpointError(
            f"{folder}: {len(report.missing)} model tensors not found: " + ", ".join(report.missing[:8])
        )
    return plan, report


def convert_release_files(
    folder: str | Path, output: str | Path, config: ModelConfig, progress: bool = False
) -> LoadReport:
    """Stream the six released files into one consolidated safetensors file; returns the report."""
    from tqdm import tqdm

    folder, output = Path(folder), Path(output)
    # Pass 1: metadata only. Plan the header, check every shape, collect the report.
    plan, report = plan_release_files(folder, config)

    # Pass 2: data, one tensor at a time, in the planned order.
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config.to_dict())}
    total = sum(_nbytes(d, s) for _, d, s in plan)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {output.name}", disable=not progress)
    tensors = _consolidate(folder, config, ReleaseLoader(_meta_model(config)), meta=False)
    with bar:
        write_safetensors_streaming(output, plan, tensors, metadata, on_tensor=bar.update)
    return report


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def write_safetensors_streaming(
    path: Path, plan, tensors: Iterator[tuple[str, torch.Tensor]], metadata: dict[str, str], on_tensor=None
) -> None:
    """Write a safetensors file whose header is known up front, tensor by tensor, then rename."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape in plan:
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{key}: dtype {dtype} cannot be stored in safetensors")
        size = _nbytes(dtype, shape)
        header[key] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    written = {}
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            order = iter(plan)
            for key, tensor in tensors:
                if key in written:
                    continue
                expected = next(order)
                if expected[0] != key or tensor.dtype != expected[1] or tuple(tensor.shape) != expected[2]:
                    raise CheckpointError(f"internal: writing {key} where the header planned {expected[0]}")
                data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                f.write(data.tobytes())
                written[key] = True
                if on_tensor is not None:
                    on_tensor(data.nbytes)
            if len(written) != len(plan):
                raise CheckpointError(f"internal: wrote {len(written)} of {len(plan)} planned tensors")


def read_consolidated_config(path: str | Path) -> ModelConfig:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a vsal consolidated checkpoint (write one with `vsal-export convert`)"
        )
    return ModelConfig.from_dict(json.loads(meta["config"]))


def load_consolidated(path: str | Path, dtype: torch.dtype = torch.float32):
    """A VideoSalmonn with the weights of a consolidated checkpoint (strict: every key, every shape)."""
    from safetensors import safe_open
    from vsal.export import build_model

    config = read_consolidated_config(path)
    model = build_model(config).to(dtype)
    params = model.state_dict()
    expected = {k for k in params if not _derived(k)}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if keys != expected:
            missing, extra = sorted(expected - keys), sorted(keys - expected)
            raise CheckpointError(
                f"{path}: keys do not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        with torch.no_grad():
            for key in sorted(keys):
                params[key].copy_(f.get_tensor(key).to(dtype))
    return model
