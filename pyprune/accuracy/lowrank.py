"""Low-rank factorisation: SVD for Linear, Tucker-2 (or CP) for Conv2d, ranks by energy or by measured latency.

- Linear (O, I) -> Linear(I, r, no bias) then Linear(r, O): the truncated SVD, the best rank-r approximation.
- Conv2d (O, C, kh, kw), Tucker-2 (Kim et al. 2016): 1x1 conv C -> r_in, kh x kw conv r_in -> r_out (the
  core, with the original stride / padding / dilation), 1x1 conv r_out -> O. Factors from the truncated HOSVD
  of the two channel modes, refined by a few HOOI sweeps.
- Conv2d, CP (Lebedev et al. 2015): 1x1 conv C -> R, depthwise kh x 1, depthwise 1 x kw, 1x1 conv R -> O,
  factors from CP-ALS.

Energy rank of a mode: the smallest r whose squared singular values hold ``energy`` of the total. A layer is
left alone when the factorised form would not have fewer parameters (e.g. a 1-channel input conv).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compare.timing import fixed_threads, same_round_speedup, time_interleaved

METHODS = ("tucker", "cp")
RANK_BY = ("energy", "latency")


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2). s: (K,) in descending order -> r in [1, K]."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(
            f"energy must be in (0, 1] (fraction of squared singular values kept), got {energy!r}"
        )
    e = singular_values.double().pow(2)
    if float(e.sum()) == 0.0:
        return 1
    frac = e.cumsum(0) / e.sum()
    return min(len(e), int(torch.searchsorted(frac, torch.tensor([energy - 1e-12], dtype=frac.dtype))) + 1)


def _mode_svd(w: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    mat = w.movedim(mode, 0).reshape(w.shape[mode], -1)
    u, s, _ = torch.linalg.svd(mat, full_matrices=False)
    return u, s


def svd_linear(linear: nn.Linear, rank: int) -> nn.Sequential:
    """Rank-``rank`` factorisation of ``linear``: Sequential(Linear(I, r, bias=False), Linear(r, O))."""
    w = linear.weight.detach().double()
    o, i = w.shape
    if not 1 <= rank <= min(o, i):
        raise ValueError(f"rank must be in [1, {min(o, i)}] for a {o}x{i} Linear, got {rank!r}")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(i, rank, bias=False)
    second = nn.Linear(rank, o, bias=linear.bias is not None)
    dt = linear.weight.dtype
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).to(dt))
        second.weight.copy_((u[:, :rank] * root).to(dt))
        if linear.bias is not None:
            second.bias.copy_(linear.bias.detach())
    return nn.Sequential(first, second)


def tucker2_factors(w: torch.Tensor, r_out: int, r_in: int, sweeps: int = 3):
    """Tucker-2 of a conv weight w: (O, C, kh, kw) -> (core (r_out, r_in, kh, kw), U_out (O, r_out),
    U_in (C, r_in)) with w ~= core x_0 U_out x_1 U_in. HOSVD start, then ``sweeps`` HOOI updates."""
    w = w.detach().double()
    u_out = _mode_svd(w, 0)[0][:, :r_out]
    u_in = _mode_svd(w, 1)[0][:, :r_in]
    for _ in range(sweeps):
        y = torch.einsum("ocij,cr->orij", w, u_in)
        u_out = _mode_svd(y, 0)[0][:, :r_out]
        y = torch.einsum("ocij,os->scij", w, u_out)
        u_in = _mode_svd(y, 1)[0][:, :r_in]
    core = torch.einsum("ocij,os,cr->srij", w, u_out, u_in)
    return core, u_out, u_in


def tucker2_conv(conv: nn.Conv2d, r_out: int, r_in: int) -> nn.Sequential:
    """Sequential(1x1 C->r_in, kh x kw r_in->r_out (stride, padding, dilation of ``conv``), 1x1 r_out->O)."""
    _check_conv(conv)
    o, c = conv.out_channels, conv.in_channels
    if not (1 <= r_out <= o and 1 <= r_in <= c):
        raise ValueError(f"ranks must be r_out in [1, {o}], r_in in [1, {c}]; got {r_out}, {r_in}")
    core, u_out, u_in = tucker2_factors(conv.weight, r_out, r_in)
    dt = conv.weight.dtype
    first = nn.Conv2d(c, r_in, 1, bias=False)
    mid = nn.Conv2d(r_in, r_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)
    last = nn.Conv2d(r_out, o, 1, bias=conv.bias is not None)
    with torch.no_grad():
        first.weight.copy_(u_in.T[:, :, None, None].to(dt))
        mid.weight.copy_(core.to(dt))
        last.weight.copy_(u_out[:, :, None, None].to(dt))
        if conv.bias is not None:
            last.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, mid, last)


def _khatri_rao(mats: list[torch.Tensor]) -> torch.Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, out.shape[1])
    return out


def cp_als(
    t: torch.Tensor, rank: int, iters: int = 100, seed: int = 0, tol: float = 1e-7
) -> list[torch.Tensor]:
    """CP decomposition by alternating least squares: t ~= sum_r prod_k factors[k][:, r] (outer product).
    t: any order >= 2; returns one (dim_k, rank) factor per mode (the scale is in factors[0])."""
    t = t.detach().double()
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(d, rank, generator=gen, dtype=torch.double) for d in t.shape]
    unfold = [t.movedim(k, 0).reshape(t.shape[k], -1) for k in range(t.dim())]
    norm, prev = t.norm(), None
    for _ in range(iters):
        for k in range(t.dim()):
            others = [factors[j] for j in range(t.dim()) if j != k]
            gram = torch.ones(rank, rank, dtype=torch.double)
            for f in others:
                gram = gram * (f.T @ f)
            kr = _khatri_rao(others)  # rows ordered like the unfolding's columns (C order of the other modes)
            factors[k] = torch.linalg.lstsq(gram, (unfold[k] @ kr).T).solution.T
            if k != 0:  # keep scales in factor 0 so the others stay well conditioned
                s = factors[k].norm(dim=0).clamp_min(1e-12)
                factors[k] = factors[k] / s
                factors[0] = factors[0] * s
        err = float((cp_reconstruct(factors) - t).norm() / norm)
        if prev is not None and abs(prev - err) < tol:
            break
        prev = err
    return factors


def cp_reconstruct(factors: list[torch.Tensor]) -> torch.Tensor:
    shape = [f.shape[0] for f in factors]
    return (factors[0] @ _khatri_rao(factors[1:]).T).reshape(shape)


def cp_conv(conv: nn.Conv2d, rank: int, seed: int = 0) -> nn.Sequential:
    """Sequential(1x1 C->R, depthwise kh x 1, depthwise 1 x kw, 1x1 R->O) from a rank-R CP of the weight."""
    _check_conv(conv)
    if not rank >= 1:
        raise ValueError(f"rank must be >= 1, got {rank!r}")
    a, b, kh_f, kw_f = cp_als(conv.weight, rank, seed=seed)
    o, c = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    dt = conv.weight.dtype
    first = nn.Conv2d(c, rank, 1, bias=False)
    vert = nn.Conv2d(rank, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=rank, bias=False)
    horiz = nn.Conv2d(rank, rank, (1, kw), (1, sw), (0, pw), (1, dw), groups=rank, bias=False)
    last = nn.Conv2d(rank, o, 1, bias=conv.bias is not None)
    with torch.no_grad():
        first.weight.copy_(b.T[:, :, None, None].to(dt))
        vert.weight.copy_(kh_f.T[:, None, :, None].to(dt))
        horiz.weight.copy_(kw_f.T[:, None, None, :].to(dt))
        last.weight.copy_(a[:, :, None, None].to(dt))
        if conv.bias is not None:
            last.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, vert, horiz, last)


def _check_conv(conv: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("only Conv2d with groups=1, zero padding and numeric padding can be factorised")


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@dataclass
class LowRankReport:
    """Per layer: the ranks chosen (or why the layer was left alone) and, with rank_by="latency", the
    measured speedup of the factorised layer over the original on the layer's real input."""

    layers: dict[str, dict] = field(default_factory=dict)

    @property
    def factorised(self) -> list[str]:
        return [n for n, d in self.layers.items() if d.get("ranks")]

    def summary(self) -> str:
        parts = []
        for n, d in self.layers.items():
            if d.get("ranks"):
                sp = f" {d['speedup']:.2f}x" if d.get("speedup") else ""
                parts.append(f"{n}:r={'/'.join(map(str, d['ranks']))}{sp}")
        kept = len(self.layers) - len(self.factorised)
        return ", ".join(parts) + (f"; {kept} layers kept" if kept else "")


def _candidate(
    mod: nn.Module, energy: float, method: str, seed: int
) -> tuple[nn.Module, tuple[int, ...]] | None:
    if isinstance(mod, nn.Linear):
        r = energy_rank(torch.linalg.svdvals(mod.weight.detach().double()), energy)
        new = svd_linear(mod, r)
        ranks: tuple[int, ...] = (r,)
    else:
        w = mod.weight.detach().double()
        r_out, r_in = energy_rank(_mode_svd(w, 0)[1], energy), energy_rank(_mode_svd(w, 1)[1], energy)
        if method == "tucker":
            new, ranks = tucker2_conv(mod, r_out, r_in), (r_out, r_in)
        else:
            r = max(r_out, r_in)
            new, ranks = cp_conv(mod, r, seed), (r,)
    if _n_params(new) >= _n_params(mod):
        return None
    return new, ranks


def _layer_inputs(model: nn.Module, names: list[str], args: tuple) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_m: nn.Module, inputs: tuple, _out: torch.Tensor) -> None:  # returns None: output unchanged
            got.setdefault(name, inputs[0].detach())

        return fn

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model.eval()(*args)
    finally:
        for h in hooks:
            h.remove()
    return got


def lowrank(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple | None = None,
    energy: float = 0.9,
    method: str = "tucker",
    rank_by: str = "energy",
    energies: tuple[float, ...] = (0.99, 0.95, 0.9, 0.8, 0.7, 0.5),
    min_speedup: float = 1.05,
    threads: int | None = 1,
    budget_s: float = 0.4,
    skip: tuple[str, ...] = (),
    seed: int = 0,
    inplace: bool = False,
) -> tuple[nn.Module, LowRankReport]:
    """Factorise every Linear (SVD) and groups=1 Conv2d (Tucker-2 or CP) of ``model``; returns (model, report).

    rank_by="energy": each layer keeps ``energy`` of its squared singular values (per channel mode for convs).
    rank_by="latency": for each layer, candidates at ``energies`` (highest first) are timed against the
    original layer on the layer's input from ``example_inputs`` (interleaved rounds, ``threads`` threads); the
    first whose measured speedup is >= ``min_speedup`` is used, and a layer without one stays as it is.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    if rank_by == "latency" and example_inputs is None:
        raise ValueError("rank_by='latency' needs example_inputs (the layers are timed on their real inputs)")
    energy_rank(torch.ones(1), energy)  # validates energy
    target = model if inplace else copy.deepcopy(model)
    names = [
        n
        for n, m in target.named_modules()
        if n not in skip
        and (
            isinstance(m, nn.Linear)
            or (
                isinstance(m, nn.Conv2d)
                and m.groups == 1
                and m.padding_mode == "zeros"
                and not isinstance(m.padding, str)
            )
        )
    ]
    report = LowRankReport()
    inputs: dict[str, torch.Tensor] = {}
    if rank_by == "latency":
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        inputs = _layer_inputs(target, names, tuple(args))
    for name in names:
        mod = target.get_submodule(name)
        choice, info = None, {"ranks": None}
        if rank_by == "energy":
            cand = _candidate(mod, energy, method, seed)
            if cand is None:
                info["note"] = "no fewer parameters at this energy"
            else:
                choice = cand[0]
                info["ranks"] = cand[1]
        elif name not in inputs:
            info["note"] = "not reached by example_inputs"
        else:
            x = inputs[name]
            cands = [c for e in energies if (c := _candidate(mod, e, method, seed)) is not None]
            if not cands:
                info["note"] = "no candidate with fewer parameters"
            else:
                fns = {"dense": lambda mod=mod, x=x: mod(x)}
                fns.update({f"c{i}": (lambda c=c, x=x: c[0](x)) for i, c in enumerate(cands)})
                with fixed_threads(threads) as nt:
                    samples = time_interleaved(fns, rounds=5, threads=nt, budget_s=budget_s, seed=seed)
                for i, c in enumerate(cands):
                    sp = same_round_speedup(samples["dense"], samples[f"c{i}"])
                    if sp >= min_speedup:
                        choice, info = c[0], {"ranks": c[1], "speedup": sp}
                        break
                if choice is None:
                    info["note"] = f"no candidate reached {min_speedup}x measured"
        report.layers[name] = info
        if choice is not None:
            parent, _, attr = name.rpartition(".")
            setattr(target.get_submodule(parent) if parent else target, attr, choice)
    return target, report


def relative_error(original: torch.Tensor, approx: torch.Tensor) -> float:
    """||original - approx||_F / ||original||_F."""
    return float(
        (original.detach().double() - approx.detach().double()).norm()
        / original.detach().double().norm().clamp_min(1e-30)
    )


def dense_weight(module: nn.Module) -> Any:
    """The dense weight a factorised Sequential computes: (O, I) for SVD, (O, C, kh, kw) for Tucker-2 / CP."""
    mods = list(module)
    if all(isinstance(m, nn.Linear) for m in mods):
        return mods[1].weight.detach().double() @ mods[0].weight.detach().double()
    if len(mods) == 3:
        u_in = mods[0].weight.detach().double()[:, :, 0, 0]  # (r_in, C)
        u_out = mods[2].weight.detach().double()[:, :, 0, 0]  # (O, r_out)
        return torch.einsum("srij,os,rc->ocij", mods[1].weight.detach().double(), u_out, u_in)
    b = mods[0].weight.detach().double()[:, :, 0, 0]  # (R, C)
    kh = mods[1].weight.detach().double()[:, 0, :, 0]  # (R, kh)
    kw = mods[2].weight.detach().double()[:, 0, 0, :]  # (R, kw)
    a = mods[3].weight.detach().double()[:, :, 0, 0]  # (O, R)
    return torch.einsum("or,rc,ri,rj->ocij", a, b, kh, kw)
