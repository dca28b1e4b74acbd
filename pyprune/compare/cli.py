"""The ``compare``, ``profile`` and ``advise`` subcommands of the ``pyprune`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time

# name -> (zoo constructor name and args, input kind, default size): random weights, no downloads
MODELS = {
    "resnet50": ("resnet50", (), "image", 224),
    "bert-base": ("bert", ("base",), "tokens", 128),
    "bert-small": ("bert", ("small",), "tokens", 128),
    "resnet18": ("resnet18", (), "image", 224),
    "mobilenet_v2": ("mobilenet_v2", (), "image", 224),
    "vgg16_bn": ("vgg16_bn", (), "image", 224),
    "vit_small": ("vit_small", (), "image", 224),
    "lenet5": ("lenet5", (), "image1", 32),
}
DEFAULT_MODELS = ("resnet50", "bert-base")
DEFAULT_LEVELS = (0.5, 0.75, 0.9)
# --quick: the same models and variants at one level (2:4 still at 0.5), fewer rounds, a smaller budget
QUICK_LEVELS = (0.9,)


def model_and_inputs(
    name: str, batch: int = 1, seq: int | None = None, image: int | None = None, channels_last: bool = False
):
    """The named zoo model (eval mode) and its example inputs; ``channels_last``: an image model's weights and
    input in channels_last memory format."""
    import torch

    from .. import models

    if name not in MODELS:
        raise ValueError(f"--model: unknown model {name!r}; valid models are {list(MODELS)}")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    ctor, ctor_args, kind, size = MODELS[name]
    if channels_last and kind == "tokens":
        raise ValueError(f"--channels-last applies to image models; {name} takes token ids")
    m = getattr(models, ctor)(*ctor_args).eval()
    gen = torch.Generator().manual_seed(0)
    if kind == "tokens":
        s = size if seq is None else seq
        if not 1 <= s <= m.config.max_position_embeddings:
            raise ValueError(f"--seq must lie in [1, {m.config.max_position_embeddings}], got {s}")
        return m, (torch.randint(0, m.config.vocab_size, (batch, s), generator=gen),)
    side = size if image is None else image
    if side < 1:
        raise ValueError(f"--image must be >= 1, got {side}")
    channels = 1 if kind == "image1" else 3
    x = torch.randn(batch, channels, side, side, generator=gen)
    if channels_last:
        return m.to(memory_format=torch.channels_last), (x.contiguous(memory_format=torch.channels_last),)
    return m, (x,)


def runnable(name: str, model, inputs: tuple):
    """(model, inputs) once the model has run on the inputs; ValueError naming the size options if not."""
    import torch

    try:
        with torch.no_grad():
            model(*inputs)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ValueError(
            f"--model {name} fails on its input of shape {tuple(inputs[0].shape)} (check --batch, --seq, "
            f"--image): {str(exc).splitlines()[0]}"
        ) from exc
    return model, inputs


def takes_tokens(name: str) -> bool:
    return MODELS[name][2] == "tokens"


def check_size_options(names, args) -> None:
    """Before anything runs: ``--seq`` needs a model that takes token ids among ``names``, ``--image`` and
    ``--channels-last`` one that takes images (with both kinds, each applies to its own kind only)."""
    for n in names:
        if n not in MODELS:
            raise ValueError(f"--model: unknown model {n!r}; valid models are {list(MODELS)}")
    listed = f"{', '.join(names)} {'takes' if len(names) == 1 else 'take'}"
    token_models = [n for n in names if takes_tokens(n)]
    image_models = [n for n in names if not takes_tokens(n)]
    if args.seq is not None and not token_models:
        raise ValueError(f"--seq applies to bert models; {listed} images (use --image)")
    for option, given in (("--image", args.image is not None), ("--channels-last", args.channels_last)):
        if given and not image_models:
            raise ValueError(f"{option} applies to image models; {listed} token ids")


def resolve_cli_device(device: str) -> str:
    """``--device``: valid names are checked; ``cuda`` without a GPU warns and continues with the CPU."""
    import torch

    valid = ("cpu", "cuda")
    if device.split(":")[0] not in valid:
        raise ValueError(f"--device: unknown device {device!r}; valid devices are {list(valid)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"pyprune: --device {device}: no CUDA GPU is available here (torch {torch.__version__}, "
            "torch.cuda.is_available() is False); continuing on the CPU",
            file=sys.stderr,
        )
        return "cpu"
    return device


def positive(kind, zero: bool = False):
    """An argparse type: a number of ``kind`` (int or float) > 0, or >= 0 with ``zero`` (NaN never)."""

    def parse(text: str):
        value = kind(text)
        if not (value >= 0 if zero else value > 0):
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero else '>'} 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid <type> value" messages
    return parse


def _common(p: argparse.ArgumentParser, model_nargs) -> None:
    p.add_argument(
        "--model",
        nargs=model_nargs,
        default=None,
        help=f"one of {', '.join(MODELS)}",
    )
    p.add_argument("--batch", type=positive(int), default=1)
    p.add_argument(
        "--seq", type=positive(int), default=None, help="sequence length for bert models (default 128)"
    )
    p.add_argument("--image", type=positive(int), default=None, help="image side (default 224; lenet5 32)")
    p.add_argument(
        "--threads", type=positive(int), default=None, help="torch threads (default: torch's current)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda without a GPU: warns, uses the CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="image models: weights and input in channels_last memory format, for every variant (dense too)",
    )


def _methods(values, option: str = "--methods"):
    from . import METHODS

    bad = [m for m in values if m not in METHODS]
    if bad:
        raise ValueError(f"{option}: unknown {bad}; valid methods are {list(METHODS)}")
    return tuple(values)


def _suffixed(path: str, model: str, many: bool) -> str:
    if not many:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}_{model}{ext}"


def _channels_last(name: str, args) -> bool:
    """--channels-last for this model: image models only (check_size_options refused it with none)."""
    return args.channels_last and not takes_tokens(name)


def _run_name(name: str, args) -> str:
    """The report's model name, which also names its files: channels_last runs apart from the default ones."""
    return f"{name} channels_last" if _channels_last(name, args) else name


def _compare(args) -> int:
    from . import compare, measure_peak
    from .timing import fixed_threads

    names = args.model or list(DEFAULT_MODELS)
    check_size_options(names, args)
    methods = _methods(args.methods)
    device = resolve_cli_device(args.device)
    levels = args.levels or (QUICK_LEVELS if args.quick else DEFAULT_LEVELS)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 5)
    budget = args.budget if args.budget is not None else (4.0 if args.quick else 20.0)
    t0 = time.perf_counter()
    with fixed_threads(args.threads) as nthreads:
        peak = measure_peak(nthreads, device)
    many = len(names) > 1
    # every model built and run once before any timing: a size one of them refuses (--seq past its positions,
    # --image for a fixed-size model) fails now, not after the models before it have run
    prepared = []
    for name in names:
        built = model_and_inputs(name, args.batch, args.seq, args.image, _channels_last(name, args))
        prepared.append((name, *runnable(name, *built)))
    for name, model, inputs in prepared:
        t1 = time.perf_counter()
        report = compare(
            model, inputs, methods=methods, levels=levels, device=device, threads=args.threads, rounds=rounds,
            budget_s=budget, name=_run_name(name, args), per_layer=args.per_layer, peak=peak,
            progress=not args.no_progress,
        )  # fmt: skip
        report.print()
        if args.per_layer:
            print(report.advice_text(per_layer=False))
        print(f"({name}: {time.perf_counter() - t1:.1f} s)")
        written = []
        if args.out:
            written += report.save(args.out)
        if args.json:
            report.to_json(_suffixed(args.json, name, many))
            written.append(_suffixed(args.json, name, many))
        if args.csv:
            report.to_csv(_suffixed(args.csv, name, many))
            written.append(_suffixed(args.csv, name, many))
        if args.plot:
            written += report.plot(args.plot)
        for p in written:
            print(f"wrote {p}")
    print(f"(total {time.perf_counter() - t0:.1f} s)")
    return 0


def _profile(args) -> int:
    from . import measure_peak
    from .profile import profile_variant
    from .timing import fixed_threads

    name = args.model or "bert-small"
    check_size_options([name], args)
    if args.method not in _methods([args.method], "--method") or args.method == "dense":
        raise ValueError(f"--method: {args.method!r} is not a pruned variant")
    if not 0.0 < args.level < 1.0:
        raise ValueError(f"--level must lie in (0, 1), got {args.level}")
    device = resolve_cli_device(args.device)
    model, inputs = model_and_inputs(name, args.batch, args.seq, args.image, args.channels_last)
    trace = args.trace or f"pyprune_trace_{name}_{args.method.replace(':', '')}_{args.level:g}.json"
    t0 = time.perf_counter()
    with fixed_threads(args.threads) as nthreads:
        peak = measure_peak(nthreads, device)
    rep = profile_variant(
        model, inputs, args.method, args.level, trace=trace, device=device, threads=args.threads,
        layer_repeats=args.repeats, peak=peak, progress=not args.no_progress, name=_run_name(name, args),
    )  # fmt: skip
    level = 0.5 if args.method == "2:4" else args.level
    print(rep.header())
    print(rep.layer_table(args.method, level))
    row = rep._row(args.method, level)
    if row is not None:
        print(f"whole model: {row['speedup']:.2f}x vs dense; {row['explain']}")
    print(f"wrote chrome trace {trace} (chrome://tracing or ui.perfetto.dev)")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _advise(args) -> int:
    from . import compare

    name = args.model or "bert-small"
    check_size_options([name], args)
    device = resolve_cli_device(args.device)
    pruned = tuple(m for m in _methods(args.methods) if m != "dense")
    if not pruned:
        raise ValueError("--methods: name at least one pruned form to advise on (dense is always timed)")
    methods = ("dense", *pruned)
    model, inputs = model_and_inputs(name, args.batch, args.seq, args.image, args.channels_last)
    t0 = time.perf_counter()
    rep = compare(
        model, inputs, methods=methods, levels=args.levels, device=device, threads=args.threads,
        rounds=args.rounds, budget_s=args.budget, name=_run_name(name, args), per_layer=True,
        progress=not args.no_progress,
    )  # fmt: skip
    print(rep.header())
    print(rep.advice_text(per_layer=not args.summary))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


def friendly(fn):
    """Bad arguments end with ``pyprune <command>: error: <message>`` and exit status 2, as argparse does."""

    def run(args) -> int:
        try:
            return fn(args)
        except ValueError as exc:
            print(f"pyprune {args.command}: error: {exc}", file=sys.stderr)
            return 2

    return run


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``compare``, ``profile`` and ``advise``; each parser's ``func`` default runs it."""
    from . import METHODS

    cp = sub.add_parser(
        "compare",
        help="time dense, masked, channel-pruned and sparse variants side by side",
        description=f"Default: {' and '.join(DEFAULT_MODELS)} at sparsity {' '.join(map(str, DEFAULT_LEVELS))}, "
        "every method, 5 interleaved rounds within a 20 s timing budget per model.",
    )
    _common(cp, "+")
    cp.add_argument("--levels", type=float, nargs="+", default=None, help="sparsity levels in (0, 1)")
    cp.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {', '.join(METHODS)}")
    cp.add_argument(
        "--rounds", type=positive(int), default=None, help="interleaved rounds (default 5; --quick 3)"
    )
    cp.add_argument(
        "--budget", type=positive(float), default=None, help="seconds for the timing rounds (default 20)"
    )
    cp.add_argument(
        "--quick", action="store_true", help=f"levels {' '.join(map(str, QUICK_LEVELS))}, 3 rounds, 4 s"
    )
    cp.add_argument("--per-layer", action="store_true", help="also time every weight layer; prints advice")
    cp.add_argument("--out", default=None, metavar="DIR", help="write txt, JSON, CSV and PNGs into DIR")
    cp.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    cp.add_argument("--csv", default=None, metavar="PATH", help="also write the report as CSV")
    cp.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots into DIR")
    cp.set_defaults(func=friendly(_compare))

    pp = sub.add_parser("profile", help="per-layer time, intensity, bound and break-even of one variant")
    _common(pp, None)
    pp.add_argument("--method", default="csr", help=f"one of {', '.join(METHODS[1:])}")
    pp.add_argument("--level", type=float, default=0.9)
    pp.add_argument("--repeats", type=positive(int), default=5, help="forward passes per per-layer timing")
    pp.add_argument(
        "--trace", default=None, metavar="PATH", help="chrome trace file (default pyprune_trace_*.json)"
    )
    pp.set_defaults(func=friendly(_profile))

    ap = sub.add_parser(
        "advise", help="per layer, which form (dense, csr, bsr, 2:4) is fastest at each budget"
    )
    _common(ap, None)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.9])
    ap.add_argument("--methods", nargs="+", default=["channel", "csr", "bsr", "2:4", "torch.sparse"])
    ap.add_argument("--rounds", type=positive(int), default=3)
    ap.add_argument("--budget", type=positive(float), default=10.0)
    ap.add_argument("--summary", action="store_true", help="counts per form, not every layer")
    ap.set_defaults(func=friendly(_advise))
