"""Bad inputs give clear errors, never a crash, a silent wrong result or code execution: the ops
(fuzzed, tests/fuzz_ops.py), the temperature and NaN rules, the one random stream, checkpoints and
data files, and the errors of convert, PolicyNet and SpotTuneModel."""
import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import spottune_ext as se
import spottune_ext.data  # noqa: F401  (se.data)
from spottune_ext import _checks, backends, reference
from spottune_ext.models import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = ["cpp"] + (["triton"] if INTERPRET else [])
ALL = ["torch"] + KERNELS


def _run_python(code_or_args, timeout, env=None):
    args = code_or_args if isinstance(code_or_args, list) else ["-c", code_or_args]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------------------------- ops

def test_fuzz_ops_correct_or_clear_error_never_a_crash():
    # A subprocess: a segfault fails this test (its output names the case) instead of killing pytest.
    result = _run_python([os.path.join(ROOT, "tests", "fuzz_ops.py"), "600"], timeout=600)
    tail = (result.stdout[-3000:] + result.stderr[-5000:])
    assert result.returncode == 0, f"exit status {result.returncode} (negative: killed by a signal):\n{tail}"
    assert "FUZZ OK" in result.stdout, tail


@pytest.mark.parametrize("backend", KERNELS)
def test_reported_crashes_are_clear_errors(backend):
    """The inputs that corrupted memory: a non-permutation dest/index, a short noise or soft."""
    x = torch.ones(2, 8)
    combine = backends.kernel("combine_rows", backend)
    gather = backends.kernel("gather_rows", backend)
    for dest in ([4, 1, 2, 3], [2**40, 1, 2, 3], [-1, 1, 2, 3], [0, 0, 2, 3]):
        with pytest.raises((ValueError, RuntimeError), match="dest must be a permutation of range"):
            se.combine_rows(x, x, torch.tensor(dest), backend=backend)
        with pytest.raises((ValueError, RuntimeError), match="dest must be a permutation of range"):
            combine(x, x, torch.tensor(dest), None, False)
        with pytest.raises((ValueError, RuntimeError), match="index must be a permutation of range"):
            gather(torch.ones(4, 8), torch.tensor(dest), None)
    gumbel = backends.kernel("gumbel_st", backend)
    with pytest.raises((ValueError, RuntimeError), match="noise"):
        gumbel(torch.zeros(1 << 16, 1, 2), torch.rand(1), None, 1.0, True)
    with pytest.raises((ValueError, RuntimeError), match="soft"):
        backends.kernel("gumbel_st_backward", backend)(torch.ones(1 << 16, 1), torch.rand(1, 1), 1.0)
    with pytest.raises((ValueError, RuntimeError), match="seed"):
        gumbel(torch.zeros(4, 1, 2), None, torch.tensor([1.5]), 1.0, True)
    with pytest.raises((TypeError, RuntimeError), match="logits"):
        gumbel(torch.zeros(4, 1, 2, dtype=torch.int64), None, None, 1.0, False)


def test_torch_backend_rejects_a_repeated_destination():
    x = torch.ones(2, 8)
    with pytest.raises(ValueError, match=r"dest must be a permutation of range\(4\), but 1 appears 2 times"):
        se.combine_rows(x, x, torch.tensor([0, 1, 1, 3]), backend="torch")
    with pytest.raises(ValueError, match=r"index\[0\] = 4 is out of range"):
        se.gather_rows(torch.ones(4, 8), torch.tensor([4, 1, 2, 3]), backend="torch")


@pytest.mark.parametrize("backend", ALL)
def test_tau_whose_inverse_overflows_float32_is_rejected(backend):
    logits = torch.randn(8, 3, 2, requires_grad=True)
    for tau in (1e-39, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau >= 2.9"):
            se.gumbel_st(logits, tau, backend=backend)
    with pytest.raises(TypeError, match="tau as a number"):
        se.gumbel_st(logits, "5", backend=backend)
    if backend != "torch":
        with pytest.raises((ValueError, RuntimeError), match="tau"):
            backends.kernel("gumbel_st", backend)(logits.detach(), None, None, 1e-39, False)
    # The smallest accepted tau: finite decisions and gradients.
    out = se.gumbel_st(logits, _checks.TAU_MIN, backend=backend, generator=torch.Generator().manual_seed(0))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()


def test_nan_logits_give_nan_decisions_on_every_backend():
    logits = torch.randn(6, 4, 2)
    logits[1, 2, 0] = float("nan")
    logits[3, 0] = float("inf")  # inf - inf: NaN too
    logits[4, 1, 1] = float("inf")  # a finite difference of inf: a valid decision
    noise = torch.rand(6, 4)
    outs = {b: se.gumbel_st(logits, 1.0, noise=noise, backend=b) for b in ALL}
    nan = torch.zeros(6, 4, dtype=torch.bool)
    nan[1, 2] = nan[3, 0] = True
    for backend, out in outs.items():
        assert torch.equal(torch.isnan(out), nan), backend
        assert torch.equal(out[~nan], outs["torch"][~nan]), backend
        assert out[4, 1] == 1
        with pytest.raises(ValueError, match="exactly 0 or 1, got 2 other value.*NaN policy logits"):
            se.route_plan(out, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_one_seed_gives_the_same_decisions_on_every_backend(dtype):
    logits = (torch.randn(2000, 5, 2) * 2).to(dtype)
    outs = {b: se.gumbel_st(logits, 1.0, generator=torch.Generator().manual_seed(7), backend=b) for b in ALL}
    if CUDA:  # the seed comes from the CUDA generator there: the CUDA backends agree among themselves
        cuda = {b: se.gumbel_st(logits.cuda(), 1.0, generator=torch.Generator("cuda").manual_seed(7), backend=b)
                for b in ("torch", "cuda", "triton")}
        for backend, out in cuda.items():
            assert int((out != cuda["torch"]).sum()) <= 1, f"{backend} on CUDA"
    for backend, out in outs.items():
        mismatches = int((out != outs["torch"]).sum())
        # A decision within rounding of a tie (|l1 - l0 + g| below ~1e-6) may go either way.
        assert mismatches <= 1, f"{backend}: {mismatches} of {out.numel()} decisions differ from the torch backend"


def test_philox_reference_takes_an_int_or_a_tensor_seed():
    for seed in (0, -1, 2**63 - 1, -2**63, 123456789012345):
        assert torch.equal(reference.philox_uniform(seed, 37), reference.philox_uniform(torch.tensor(seed), 37))


def test_reference_upcasts_before_subtracting():
    # 3.015625 - (-3.0) = 6.015625 needs 9 significant bits: bfloat16 arithmetic rounds it to 6.0.
    logits = torch.tensor([[[-3.0, 3.015625]]], dtype=torch.bfloat16)
    noise = torch.sigmoid(torch.tensor([[-6.0078125]]))  # logistic noise -6.0078: the sign depends on it
    for backend in ALL:
        assert se.gumbel_st(logits, 1.0, noise=noise, backend=backend).item() == 1.0, backend
    soft = reference.gumbel_st(logits, None, None, 1.0, False)[1]
    assert soft.item() == pytest.approx(torch.sigmoid(torch.tensor(6.015625)).item(), rel=0, abs=1e-7)
    assert torch.equal(soft, backends.kernel("gumbel_st", "cpp")(logits, None, None, 1.0, False)[1])


@pytest.mark.skipif(not INTERPRET, reason="the Triton backend on CPU tensors needs TRITON_INTERPRET=1")
def test_triton_fp64_uses_a_fp64_temperature():
    logits = torch.tensor([[[0.0, 1e-3]]], dtype=torch.float64)
    tau = 3.0
    hard, soft = backends.kernel("gumbel_st", "triton")(logits, None, None, tau, False)
    assert soft.dtype == torch.float64
    assert soft.item() == pytest.approx(torch.sigmoid(torch.tensor(1e-3 / tau, dtype=torch.float64)).item(),
                                        rel=0, abs=1e-15)


def test_package_imports_and_runs_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as where it is not installed
import torch, spottune_ext as se
x = torch.randn(4, 3)
assert torch.equal(se.gather_rows(x, torch.tensor([3, 2, 1, 0]), backend="cpp"), x.flip(0))
se.gumbel_st(torch.randn(4, 2, 2), 1.0, backend="torch")
try:
    se.gumbel_st(torch.randn(4, 2, 2), 1.0, backend="triton")
except ValueError as err:
    assert "needs triton" in str(err), err
else:
    raise AssertionError("the triton backend ran without triton")
loaded = [m for m in sys.modules if m.startswith("spottune_ext.triton.")]
assert not loaded, loaded
print("ok")
"""
    result = _run_python(code, timeout=300, env={"TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# -------------------------------------------------------------------------------- models and blocks

def test_convert_policy_and_model_errors_name_the_argument():
    backbone = se.models.DecathlonResNet(3, (1, 1, 1), (8, 16, 32), 8)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        se.convert(backbone, num_classes=True)
    with pytest.raises(TypeError, match=r"adaptive_blocks must hold int block indices, got \['a'\]"):
        se.convert(backbone, adaptive_blocks=["a"])
    with pytest.raises(TypeError, match=r"adaptive_blocks must hold int block indices, got \[1.7\]"):
        se.convert(backbone, adaptive_blocks=[1.7])
    with pytest.raises(TypeError, match="tau as a number, got str '5'"):
        se.convert(backbone, tau="5")
    with pytest.raises(ValueError, match="convert: unknown backend 'nope'"):
        se.convert(backbone, backend="nope")
    with pytest.raises(ValueError, match="PolicyNet: unknown backend 'nope'"):
        se.PolicyNet(3, backend="nope")
    with pytest.raises(ValueError, match="finite tau >= 2.9"):
        se.PolicyNet(3, tau=1e-39)
    with pytest.raises(ValueError, match="every width must be a positive int"):
        se.PolicyNet(3, widths=(16, 0))
    model = se.convert(backbone, policy={"widths": (8,), "stem_width": 8})
    with pytest.raises(TypeError, match="expects decisions as a tensor"):
        model(torch.randn(2, 3, 16, 16), decisions=[[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match=r"SpotTuneModel expects x of shape \[B, C, H, W\]"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="saved state"):
        model.policy.set_extra_state({"tau": 1e-39})


# ------------------------------------------------------------------------------------- checkpoints

def _tiny_model():
    return se.convert(se.models.DecathlonResNet(3, (1, 1, 1), (8, 16, 32), 8),
                      policy={"widths": (8,), "stem_width": 8})


def _rewrite(path, payload, digest=True):
    """Writes a modified payload, with a digest that matches it (digest=True) as a malicious file would."""
    if digest:
        payload["sha256"] = checkpoint._digest(payload)
    torch.save(payload, path)


def test_checkpoint_bit_flips_are_detected(tmp_path):
    path = str(tmp_path / "a.pt")
    model = _tiny_model()
    checkpoint.save_checkpoint(model, path)
    data = open(path, "rb").read()
    state = model.state_dict()
    rng = np.random.default_rng(0)
    flipped = str(tmp_path / "b.pt")
    detected = unchanged = 0
    positions = rng.integers(0, len(data), 150)
    for pos in positions:
        corrupt = bytearray(data)
        corrupt[pos] ^= 1 << int(rng.integers(0, 8))
        open(flipped, "wb").write(corrupt)
        try:
            loaded, _ = checkpoint.load_checkpoint(flipped)
        except checkpoint.CheckpointError:
            detected += 1
            continue
        # Undetected only where the flip changed nothing the checkpoint holds (zip padding, names).
        got = loaded.state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items() if isinstance(v, torch.Tensor)), \
            f"a flip at byte {pos} changed the weights silently"
        unchanged += 1
    assert detected + unchanged == len(positions) and detected > 0


def test_malformed_checkpoints_raise_one_error_type(tmp_path):
    path = str(tmp_path / "a.pt")
    model = _tiny_model()
    checkpoint.save_checkpoint(model, path)
    good = torch.load(path, weights_only=True)
    bad = str(tmp_path / "bad.pt")

    open(bad, "wb").close()
    with pytest.raises(se.CheckpointError, match="empty"):
        se.load_checkpoint(bad)
    open(bad, "wb").write(open(path, "rb").read()[:1000])
    with pytest.raises(se.CheckpointError, match="truncated or corrupted"):
        se.load_checkpoint(bad)
    _rewrite(bad, {k: v for k, v in good.items() if k != "state_dict"})
    with pytest.raises(se.CheckpointError, match="entry 'state_dict' must be a dict, got nothing"):
        se.load_checkpoint(bad)
    absurd = {**good, "config": {**good["config"], "backbone": {**good["config"]["backbone"], "num_classes": 10**12}}}
    _rewrite(bad, absurd)
    with pytest.raises(se.CheckpointError, match="does not match its state dict"):
        se.load_checkpoint(bad)  # built on the meta device: nothing allocated
    deep = {**good, "config": {**good["config"], "backbone": {**good["config"]["backbone"],
                                                              "layers": [10**9, 1, 1]}}}
    _rewrite(bad, deep)
    with pytest.raises(se.CheckpointError, match="more than .* modules"):
        se.load_checkpoint(bad)
    _rewrite(bad, {**good, "config": {**good["config"], "backbone": {**good["config"]["backbone"],
                                                                    "num_classes": 1e12}}})
    with pytest.raises(se.CheckpointError, match="does not build a model"):
        se.load_checkpoint(bad)
    nan_state = dict(good["state_dict"])
    nan_state["backbone.fc.weight"] = torch.full_like(nan_state["backbone.fc.weight"], float("nan"))
    _rewrite(bad, {**good, "state_dict": nan_state})
    with pytest.raises(se.CheckpointError, match="weight 'backbone.fc.weight' holds NaN or Inf"):
        se.load_checkpoint(bad)
    _rewrite(bad, {**good, "state_dict": nan_state}, digest=False)  # edited without the digest
    with pytest.raises(se.CheckpointError, match="corrupted: the digest"):
        se.load_checkpoint(bad)
    bad_tau = dict(good["state_dict"])
    bad_tau["policy._extra_state"] = {"tau": 1e-39}
    _rewrite(bad, {**good, "state_dict": bad_tau})
    with pytest.raises(se.CheckpointError, match="does not fit the model.*tau"):
        se.load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        se.load_checkpoint(str(tmp_path / "missing.pt"))
    assert issubclass(se.CheckpointError, ValueError)


def test_checkpoint_temporary_files_never_stay(tmp_path):
    path = str(tmp_path / "a.pt")
    model = _tiny_model()
    stale = tmp_path / ".a.pt.tmp-killed"  # what a save killed before its rename leaves
    stale.write_bytes(b"partial")
    other = tmp_path / ".b.pt.tmp-other"  # another target's: not ours to remove
    other.write_bytes(b"partial")
    checkpoint.save_checkpoint(model, path)
    assert sorted(os.listdir(tmp_path)) == [".b.pt.tmp-other", "a.pt"]
    with pytest.raises(Exception, match="pickle"):
        checkpoint.save_checkpoint(model, path, extra={"bad": lambda: 0})
    assert sorted(os.listdir(tmp_path)) == [".b.pt.tmp-other", "a.pt"]
    se.load_checkpoint(path)


# ------------------------------------------------------------------------------------------ data

class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_gz_pickle(path, obj):
    with gzip.open(path, "wb") as f:
        pickle.dump(obj, f)


def test_crafted_data_files_cannot_run_code(tmp_path):
    labels = np.repeat(np.arange(10), 3)
    images = np.zeros((30, 28, 28), dtype=np.uint8)
    marker = tmp_path / "ran"
    evil = _RunsCode()
    evil.marker = marker
    crafted = {
        "code": evil,
        "object array": np.array([evil, 1], dtype=object),
        "not an array": {"images": images},
        "not gzip": None,
    }
    for what, obj in crafted.items():
        root = tmp_path / what.replace(" ", "_")
        root.mkdir()
        if obj is None:
            (root / "animal_data_version_3.gz").write_bytes(pickle.dumps(images))
        else:
            _write_gz_pickle(root / "animal_data_version_3.gz", obj)
        _write_gz_pickle(root / "animal_label_version_3.gz", labels)
        with pytest.raises(ValueError, match="animal_data_version_3.gz: not a gzip-compressed pickle of a numpy "
                                             "array|animal_data_version_3.gz: expected a numpy array"):
            se.data.build_datasets("animal-mnist", 28, root=str(root))
        assert not marker.exists(), f"{what}: the file ran code"
    # Plain arrays still read.
    root = tmp_path / "good"
    root.mkdir()
    _write_gz_pickle(root / "animal_data_version_3.gz", images)
    _write_gz_pickle(root / "animal_label_version_3.gz", labels)
    train, val, test, num_classes, _ = se.data.build_datasets("animal-mnist", 28, root=str(root))
    assert num_classes == 10 and len(train) + len(val) + len(test) == 30
