"""Property-based fuzzing of every op entry point (and of convert, routed models and blocks): "a
correct result or a clear error, never a crash".

Run by tests/test_safety.py in a subprocess (a segfault then fails that test instead of killing
pytest); each case is printed before it runs, so the output names the case that crashed.

    python tests/fuzz_ops.py EXAMPLES

Cases: gather_rows, combine_rows, route_plan and gumbel_st through the public functions (every
backend this machine runs) and through torch.ops.spottune_ext.* (the compiled op and its Triton
variant), gumbel_st_backward through the ops; random shapes, dtypes, layouts (contiguous,
channels_last, strided), with at most one fault per case: a wrong dtype, shape, length or type, an
index out of range (-1, B, 2**40) or repeated, a bad tau, noise, seed or soft; convert() and
PolicyNet arguments; decisions given to a routed model or block (wrong type, shape, dtype, values
other than 0/1, NaN). A valid case must equal spottune_ext.reference (a routed model or block: its
dense execution; convert: a model that runs); a faulty one must raise TypeError, ValueError or
RuntimeError whose message names the faulty argument.
"""
import os
import sys

if __name__ == "__main__":  # every case uses CPU tensors: Triton runs them in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import spottune_ext as se  # noqa: E402
from spottune_ext import backends, reference  # noqa: E402

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NOT_FLOATS = [torch.int64, torch.int32, torch.bool, torch.complex64]
ERRORS = (TypeError, ValueError, RuntimeError)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", "cpp"] + (["triton"] if INTERPRET else [])


class Case:
    """One call: what it runs, and the argument it corrupts (None = a valid call) or a reference result."""

    def __init__(self, label, call, fault=None, expect=None, check=None):
        self.label, self.call, self.fault, self.expect, self.check = label, call, fault, expect, check


def tensor(draw, shape, dtype, layout):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    t = (t * 3).to(dtype)
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided" and t.dim() >= 1:  # every other element of a tensor twice as long
        wide = torch.zeros((shape[0] * 2, *shape[1:]), dtype=dtype)
        wide[::2] = t
        return wide[::2]
    return t


def permutation(draw, n):
    return torch.tensor(draw(st.permutations(range(n))), dtype=torch.int64)


def bad_index(draw, n):
    """An index that is not a permutation of range(n), and the word its error should use."""
    kind = draw(st.sampled_from(["high", "huge", "negative", "repeat", "short", "long", "int32", "float", "list"]))
    p = permutation(draw, max(n, 1))[:n].clone()
    if kind in ("high", "huge", "negative", "repeat") and n == 0:
        kind = "long"
    if kind == "repeat" and n < 2:
        kind = "high"
    i = draw(st.integers(0, max(n - 1, 0)))
    if kind == "high":
        p[i] = n + draw(st.integers(0, 3))
    elif kind == "huge":
        p[i] = 2**40
    elif kind == "negative":
        p[i] = -draw(st.integers(1, 2**40))
    elif kind == "repeat":
        j = (i + 1) % n
        p[j] = p[i]
    elif kind == "short":
        p = p[:-1] if n else p
        if n == 0:
            p = torch.zeros(1, dtype=torch.int64)
    elif kind == "long":
        p = torch.cat([p, torch.tensor([n])])
    elif kind == "int32":
        p = p.int()
    elif kind == "float":
        p = p.float()
    else:
        p = p.tolist()
    return p


def sample_shape(draw):
    return draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))


def gather_case(draw, entry):
    B = draw(st.integers(0, 6))
    shape = [B, *sample_shape(draw)]
    dtype = draw(st.sampled_from(FLOATS))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    fault = draw(st.sampled_from([None, None, None, "x", "index", "index", "index", "mask"]))
    x = tensor(draw, shape, draw(st.sampled_from(NOT_FLOATS)) if fault == "x" else dtype, layout)
    index = bad_index(draw, B) if fault == "index" else permutation(draw, B)
    mask = None
    if fault == "mask":
        mask = draw(st.sampled_from(["shape", "dtype", "list"]))
        mask = {"shape": lambda: tensor(draw, [B + 1, *shape[1:]], dtype, "contiguous"),
                "dtype": lambda: tensor(draw, shape, torch.float64 if dtype != torch.float64 else torch.float32,
                                        "contiguous"),
                "list": lambda: [0.0] * B}[mask]()
    elif draw(st.booleans()):
        mask = tensor(draw, shape, dtype, layout)
    call, label = _entry("gather_rows", entry, (x, index, mask))
    expect = None if fault else (lambda: reference.gather_rows(x, index, mask))
    return Case(f"{label} x={_d(x)} index={_d(index)} mask={_d(mask)}", call, fault, expect)


def combine_case(draw, entry):
    n0, n1 = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    S = sample_shape(draw)
    dtype = draw(st.sampled_from(FLOATS))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    fault = draw(st.sampled_from([None, None, None, "src0", "src1", "dest", "dest", "dest", "residual"]))
    src0 = tensor(draw, [n0, *S], draw(st.sampled_from(NOT_FLOATS)) if fault == "src0" else dtype, layout)
    if fault == "src1":
        kind = draw(st.sampled_from(["dtype", "shape"]))
        src1 = (tensor(draw, [n1, *S], torch.float64 if dtype != torch.float64 else torch.float32, layout)
                if kind == "dtype" else tensor(draw, [n1, *S, 2], dtype, "contiguous"))
    else:
        src1 = tensor(draw, [n1, *S], dtype, layout)
    dest = bad_index(draw, n0 + n1) if fault == "dest" else permutation(draw, n0 + n1)
    residual = None
    if fault == "residual":
        kind = draw(st.sampled_from(["shape", "dtype"]))
        residual = (tensor(draw, [n0 + n1 + 1, *S], dtype, "contiguous") if kind == "shape" else
                    tensor(draw, [n0 + n1, *S], torch.float64 if dtype != torch.float64 else torch.float32, layout))
    elif draw(st.booleans()):
        residual = tensor(draw, [n0 + n1, *S], dtype, layout)
    relu = draw(st.booleans())
    call, label = _entry("combine_rows", entry, (src0, src1, dest, residual, relu))
    expect = None if fault else (lambda: reference.combine_rows(src0, src1, dest, residual, relu))
    check = None
    if entry[1] == "triton" and dtype == torch.bfloat16 and residual is not None and INTERPRET:
        # The interpreter rounds float32 -> bfloat16 toward zero (the GPU to nearest even): one ulp.
        def check(got, want):
            return got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0)
    return Case(f"{label} src0={_d(src0)} src1={_d(src1)} dest={_d(dest)} residual={_d(residual)} relu={relu}",
                call, fault, expect, check)


def route_plan_case(draw, entry):
    B, L = draw(st.integers(0, 6)), draw(st.integers(0, 4))
    fault = draw(st.sampled_from([None, None, "decisions", "decisions"]))
    d = (torch.rand(B, L, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))) < 0.5)
    dtype = draw(st.sampled_from(FLOATS))
    decisions = d.to(dtype)
    if fault == "decisions":
        kind = draw(st.sampled_from(["dtype", "1d", "3d", "list"]))
        decisions = {"dtype": lambda: d.to(draw(st.sampled_from(NOT_FLOATS))), "1d": lambda: d.flatten().to(dtype),
                     "3d": lambda: d[..., None].to(dtype), "list": lambda: d.tolist()}[kind]()
    chain = draw(st.booleans())
    call, label = _entry("route_plan", entry, (decisions, chain))
    expect = None if fault else (lambda: reference.route_plan(decisions, chain))
    if entry[0] == "public" and expect is not None:
        expect = (lambda: tuple(reference.route_plan(decisions, chain)[:2]))
        raw = call
        call = (lambda: tuple(raw()[:2]))
    return Case(f"{label} decisions={_d(decisions)} chain={chain}", call, fault, expect)


BAD_TAUS = [0.0, -1.0, 1e-39, float("nan"), float("inf"), "5", True, None]


def gumbel_case(draw, entry):
    B, L = draw(st.integers(0, 5)), draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(FLOATS))
    fault = draw(st.sampled_from([None, None, None, "logits", "tau", "noise", "seed"]))
    if entry[0] == "public" and fault == "seed":
        fault = None
    logits = tensor(draw, [B, L, 2], dtype, "contiguous")
    if draw(st.integers(0, 4)) == 0 and B * L:  # a NaN logit: a NaN decision on every backend
        logits[0, 0, 1] = float("nan")
    if fault == "logits":
        kind = draw(st.sampled_from(["dtype", "2d", "last3", "list"]))
        logits = {"dtype": lambda: logits.to(draw(st.sampled_from(NOT_FLOATS))), "2d": lambda: logits[..., 0],
                  "last3": lambda: torch.cat([logits, logits[..., :1]], -1), "list": lambda: logits.tolist()}[kind]()
    tau = draw(st.sampled_from(BAD_TAUS)) if fault == "tau" else draw(st.sampled_from([1.0, 0.5, 5.0, 1e-30]))
    sample = draw(st.booleans()) or fault in ("noise", "seed")
    u = torch.rand(B, L, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    noise = u if draw(st.booleans()) and fault != "seed" else None
    if fault == "noise":
        kind = draw(st.sampled_from(["short", "huge_batch", "float64", "list"]))
        noise = {"short": lambda: u.flatten()[:max(B * L - 1, 0)].view(-1, 1) if B * L else torch.rand(1, 1),
                 "huge_batch": lambda: torch.rand(1, 1), "float64": lambda: u.double(),
                 "list": lambda: u.tolist()}[kind]()
        if kind == "huge_batch":  # the segfault of a short noise under a large batch
            logits = torch.zeros(1 << 16, 1, 2, dtype=dtype)
    seed_value = draw(st.integers(-2**63, 2**63 - 1))
    seed = torch.tensor(seed_value, dtype=torch.int64)
    if fault == "seed":
        kind = draw(st.sampled_from(["missing", "float", "two", "list"]))
        seed = {"missing": lambda: None, "float": lambda: seed.double(), "two": lambda: torch.tensor([1, 2]),
                "list": lambda: [1]}[kind]()
        fault = "seed" if kind != "missing" else "noise or a seed"
    if entry[0] == "public":
        backend = entry[1]
        if noise is None and sample:
            # The decisions drawn from the generator's seed, the same on every backend.
            g = torch.Generator().manual_seed(seed_value & 0xFFFFFFFF)
            seed = torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64,
                                 generator=torch.Generator().manual_seed(seed_value & 0xFFFFFFFF))
        else:
            g = None
        call = (lambda: se.gumbel_st(logits, tau, sample=sample, noise=noise, generator=g, backend=backend))
        label = f"gumbel_st[{backend}]"
    else:
        op = _raw_op("gumbel_st", entry[1])
        call = (lambda: op(logits, noise, seed, tau, sample)[0])
        label = f"torch.ops.spottune_ext.gumbel_st{'_triton' if entry[1] == 'triton' else ''}"
    expect = None
    if fault is None:
        def expect():
            return reference.gumbel_st(logits, noise, seed if noise is None else None, tau, sample)[0].detach()
    return Case(f"{label} logits={_d(logits)} tau={tau!r} sample={sample} noise={_d(noise)} seed={_d(seed)}",
                call, fault, expect, check=lambda got, want: _same_decisions(got, want, logits, noise, sample))


def gumbel_backward_case(draw, entry):
    B, L = draw(st.integers(0, 5)), draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(FLOATS))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    fault = draw(st.sampled_from([None, "grad", "soft", "soft", "tau"]))
    grad = tensor(draw, [B, L], dtype, "contiguous")
    soft = torch.rand(B, L, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))).to(acc)
    tau = draw(st.sampled_from([1.0, 5.0]))
    if fault == "grad":
        grad = draw(st.sampled_from([grad.to(torch.int64), grad[..., None], grad.tolist()]))
    elif fault == "soft":
        kind = draw(st.sampled_from(["short", "dtype", "list"]))
        soft = {"short": lambda: soft.flatten()[:max(B * L - 1, 0)].view(-1, 1) if B * L else torch.rand(1, 1),
                "dtype": lambda: soft.half(), "list": lambda: soft.tolist()}[kind]()
    elif fault == "tau":
        tau = draw(st.sampled_from(BAD_TAUS[:6]))
    op = _raw_op("gumbel_st_backward", entry[1])
    expect = None
    if fault is None:
        def expect():
            d1 = (grad.to(acc) * soft * (1 - soft) / tau)
            return torch.stack([-d1, d1], -1).to(dtype)
    label = f"torch.ops.spottune_ext.gumbel_st_backward{'_triton' if entry[1] == 'triton' else ''}"
    return Case(f"{label} grad={_d(grad)} soft={_d(soft)} tau={tau!r}", lambda: op(grad, soft, tau), fault, expect,
                check=lambda got, want: torch.allclose(got.double(), want.double(), rtol=2e-2, atol=1e-6))


_BACKBONE = se.models.DecathlonResNet(3, (1, 1, 1), (8, 16, 32), 8).eval()
_POLICY = {"widths": (8,), "stem_width": 8}


def convert_case(draw, entry):
    """convert() and PolicyNet arguments, one of them bad; a valid model must run."""
    kwargs = {"num_classes": draw(st.sampled_from([None, 4])), "policy": dict(_POLICY)}
    fault = draw(st.sampled_from([None, "num_classes", "adaptive_blocks", "tau", "backend", "execution",
                                  "frozen_bn", "input_size", "every width", "policy"]))
    bad = {"num_classes": [True, 0, -1, 2.5, "3"], "adaptive_blocks": [["a"], [1.7], [99], "0", 5, [True], [-1]],
           "tau": ["5", 1e-39, float("nan"), 0.0, -1.0, True], "backend": ["nope", 5, None],
           "execution": ["fast", 1], "frozen_bn": ["sometimes", None], "input_size": [0, -3, 2.5, "8"],
           "every width": [(0,), (8, -1), (8.5,)], "policy": ["small", 3]}
    if fault in ("input_size", "every width"):
        kwargs["policy"]["input_size" if fault == "input_size" else "widths"] = draw(st.sampled_from(bad[fault]))
    elif fault == "policy":
        kwargs["policy"] = draw(st.sampled_from(bad[fault]))
    elif fault is not None:
        kwargs[fault] = draw(st.sampled_from(bad[fault]))
    if fault == "adaptive_blocks" and isinstance(kwargs["adaptive_blocks"], list) and \
            kwargs["adaptive_blocks"] in ([99], [-1]):
        fault = "out of range"
    x = torch.randn(2, 3, 8, 8)

    def call():
        model = se.convert(_BACKBONE, **kwargs).eval()
        return model(x)
    def check(got, _):
        return got.shape == (2, kwargs["num_classes"] or 3) and bool(torch.isfinite(got).all())
    return Case(f"convert({kwargs})", call, fault, expect=lambda: None, check=check)


def forward_case(draw, entry):
    """A routed model or block called with bad decisions; a valid call must equal the dense execution."""
    B = draw(st.integers(1, 4))
    target = draw(st.sampled_from(["model", "block"]))
    channels = 3 if target == "model" else 8  # an image, or the input of the backbone's first block
    x = torch.randn(B, channels, 8, 8, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    fault = draw(st.sampled_from([None, None, "decisions", "decisions", "decisions", "x"]))
    L = 3 if target == "model" else None
    shape = (B, L) if L else (B,)
    d = (torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))) < 0.5).float()
    if fault == "decisions":
        kind = draw(st.sampled_from(["list", "shape", "int", "half", "nan"]))
        d = {"list": lambda: d.tolist(), "shape": lambda: d[:-1] if B > 1 else torch.cat([d, d]),
             "int": lambda: d.long(), "half": lambda: d * 0.5 + 0.25,
             "nan": lambda: torch.where(torch.arange(B).view(-1, *([1] * (d.dim() - 1))) == 0, float("nan"), d)}[kind]()
        if kind == "half":
            fault = "exactly 0 or 1"
        elif kind == "nan":
            fault = "exactly 0 or 1"
    if fault == "x":
        x = draw(st.sampled_from([x.tolist(), x[0]]))
    backend = entry[1] if entry[0] == "public" else "cpp"
    if target == "model":
        model = se.convert(_BACKBONE, policy=dict(_POLICY), adaptive_blocks=[0, 1, 2], backend=backend).eval()
        dense = se.convert(_BACKBONE, policy=dict(_POLICY), adaptive_blocks=[0, 1, 2], execution="dense").eval()
        dense.load_state_dict(model.state_dict())
        arg = "decisions"
        call, ref = (lambda: model(x, decisions=d)), (lambda: dense(x, decisions=d))
    else:
        block = se.RoutedBasicBlock(_BACKBONE.layer1[0], backend=backend).eval()
        dense = se.RoutedBasicBlock(_BACKBONE.layer1[0], execution="dense").eval()
        arg = "decision"
        call, ref = (lambda: block(x, d)), (lambda: dense(x, d))
    if fault == "decisions":
        fault = arg
    with torch.no_grad():
        expect = None if fault else ref
    return Case(f"{target}[{backend}] x={_d(x)} {arg}={_d(d)}", torch.no_grad()(call), fault, expect,
                check=lambda got, want: torch.allclose(got, want, rtol=1e-4, atol=1e-5))


def _same_decisions(got, want, logits, noise, sample):
    """Equal decisions, NaN where the reference has NaN; decisions within rounding of a tie may differ."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    nan = torch.isnan(want)
    if not torch.equal(torch.isnan(got), nan):
        return False
    if not sample:
        return torch.equal(got[~nan], want[~nan])
    d = logits[..., 1].double() - logits[..., 0].double()
    if noise is not None:
        u = noise.double().clamp(1e-7, 1 - 1e-7)
        d = d + torch.log(u / (1 - u))
    clear = (~nan) & (d.abs() > 1e-2)  # seed-drawn noise: a tie within 1e-2 happens once in thousands
    return torch.equal(got[clear], want[clear])


def _raw_op(name, backend):
    return backends.kernel(name, backend)


def _entry(name, entry, args):
    kind, backend = entry
    if kind == "public":
        fn = getattr(se, name)
        return (lambda: fn(*args, backend=backend)), f"{name}[{backend}]"
    op = _raw_op(name, backend)
    return (lambda: op(*args)), f"torch.ops.spottune_ext.{name}{'_triton' if backend == 'triton' else ''}"


def _d(value):
    if isinstance(value, torch.Tensor):
        layout = "" if value.is_contiguous() else ("cl" if value.dim() == 4 else "strided")
        return f"{str(value.dtype)[6:]}{list(value.shape)}{layout}"
    return type(value).__name__ if value is not None else "None"


ENTRIES = [("public", b) for b in BACKENDS] + [("raw", b) for b in BACKENDS if b != "torch"]
BUILDERS = {"gather_rows": gather_case, "combine_rows": combine_case, "route_plan": route_plan_case,
            "gumbel_st": gumbel_case, "gumbel_st_backward": gumbel_backward_case, "convert": convert_case,
            "forward": forward_case}
stats = {"valid": 0, "errors": 0}


@st.composite
def cases(draw):
    op = draw(st.sampled_from(sorted(BUILDERS)))
    entries = [e for e in ENTRIES if (op != "gumbel_st_backward" or e[0] == "raw")
               and (op not in ("convert", "forward") or e[0] == "public")]
    return BUILDERS[op](draw, draw(st.sampled_from(entries)))


def run(case):
    print(case.label, "fault:", case.fault, flush=True)
    try:
        got = case.call()
    except ERRORS as err:
        message = str(err)
        assert case.fault is not None, f"{case.label}: a valid call raised {type(err).__name__}: {message}"
        assert case.fault in message, f"{case.label}: the error does not name {case.fault!r}: {message}"
        stats["errors"] += 1
        return
    assert case.fault is None, f"{case.label}: a call with a bad {case.fault} returned instead of raising"
    want = case.expect()
    if case.check is not None:
        ok = case.check(got, want)
    elif isinstance(want, tuple):
        ok = all(torch.equal(a, b) for a, b in zip(got, want))
    else:
        ok = got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
    assert ok, f"{case.label}: result differs from the reference:\n{got}\n{want}"
    stats["valid"] += 1


def main(examples):
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def fuzz(case):
        run(case)

    fuzz()
    print(f"FUZZ OK: {stats['valid']} valid calls equal to the reference, {stats['errors']} bad calls raised "
          f"clear errors", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
