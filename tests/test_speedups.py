"""Speed-ups that must not change the mathematics: the PrimaryCaps convolution through DFTs
(CPU_DFT_CONV), the im2col-GEMM weight gradient of the direct one (CPU_GEMM_WEIGHT_GRAD) and the
torch.compile'd capsule layer (COMPILE)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import cn, small_model
from capsnet import fast  # noqa: E402


def conv_grads(x, weight, bias, stride, gemm):
    x = x.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    out = fast.StridedConvGemmGrad.apply(x, w, b, stride) if gemm else F.conv2d(x, w, b, stride)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    (out * g).sum().backward()
    return out.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(3, 16, 20, 20, 32, 2), (2, 256, 20, 20, 256, 2), (2, 5, 11, 13, 7, 1)])
def test_gemm_weight_gradient_equals_conv2d(shape, channels_last):
    """StridedConvGemmGrad: same output and the same input, weight and bias gradients as
    F.conv2d (fp32), for the PrimaryCaps layer's shape and others, either memory format."""
    B, C, H, W, O, stride = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = 0.05 * torch.randn(O, C, 9 if H >= 18 else 3, 9 if H >= 18 else 3, generator=g)
    bias = torch.randn(O, generator=g)
    ref = conv_grads(x, weight, bias, stride, gemm=False)
    got = conv_grads(x, weight, bias, stride, gemm=True)
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def model_grads(model, x, labels):
    model.zero_grad()
    lengths, recon = model(x, labels)
    cn.CapsuleLoss()(x, labels, lengths, recon).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}



def assert_bf16_grads_agree(model, x, labels, switch, tolerance):
    """Under CPU bf16 autocast the gradients with model.conv_path.<switch> on are finite and within
    `tolerance` (relative error of the whole tensor) of those with it off."""
    grads = {}
    for on in (False, True):
        setattr(model.conv_path, switch, on)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grads[on] = model_grads(model, x, labels)
    for name in ("primary.weight", "primary.bias", "conv1.weight", "W"):
        a, b = grads[True][name].float(), grads[False][name].float()
        assert torch.isfinite(a).all(), name
        assert (a - b).norm() <= tolerance * b.norm(), name

def test_model_with_gemm_weight_gradient_trains_the_same(digit_batch):
    """A CapsuleNet with gemm_weight_grad on gets the same gradients as with it off (fp32)."""
    model = small_model(w_init_std=0.5, dft_conv=False).train()
    x, labels = digit_batch
    model.conv_path.gemm = False
    ref = model_grads(model, x, labels)
    model.conv_path.gemm = True
    got = model_grads(model, x, labels)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gemm_weight_gradient_under_bf16_autocast(digit_batch):
    """Under CPU bf16 autocast the GEMM path's PrimaryCaps weight gradient matches the standard
    path to bf16 precision (relative error of the whole tensor below 2%)."""
    model = small_model(w_init_std=0.5, dft_conv=False).train()
    x, labels = digit_batch
    assert_bf16_grads_agree(model, x, labels, "gemm", 0.02)


def test_build_model_takes_the_gemm_gradient_setting_from_the_config():
    """CPU_GEMM_WEIGHT_GRAD (a flag) reaches the model's conv path through build_model, and
    model_to_device keeps it."""
    cfg = dict(cn.default_config(), COMPILE=False, CONV1_CHANNELS=16, PRIMARY_CAPS=4)
    assert cn.model_to_device(cn.build_model(cfg), cfg, torch.device("cpu")).conv_path.gemm is True
    cfg["CPU_GEMM_WEIGHT_GRAD"] = False
    assert cn.model_to_device(cn.build_model(cfg), cfg, torch.device("cpu")).conv_path.gemm is False



def dft_conv_grads(x, weight, bias, stride, dtype):
    """conv2d_dft's output and gradients for x (B, C, H, W) given channels-last, as NCHW."""
    x = x.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    out = fast.conv2d_dft(x.permute(0, 2, 3, 1), w, b, stride, dtype)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(out.dtype)
    (out * g).sum().backward()
    return out.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("shape", [
    (2, 6, 20, 5, 9, 2),  # PrimaryCaps: DFT size 19 (odd)
    (2, 3, 12, 4, 5, 1),  # stride 1, DFT size 12 (even: a Nyquist column)
    (2, 3, 10, 4, 4, 3),  # stride 3, an unused last row and column
    (1, 2, 9, 3, 3, 2),
])
def test_dft_convolution_equals_conv2d_in_fp64(shape):
    """conv2d_dft is the same mathematics as F.conv2d: in fp64 the output and the input, weight
    and bias gradients agree to rounding, for odd and even DFT sizes and strides 1 to 3."""
    B, C, H, O, K, stride = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, H, generator=g, dtype=torch.float64)
    weight = torch.randn(O, C, K, K, generator=g, dtype=torch.float64)
    bias = torch.randn(O, generator=g, dtype=torch.float64)
    ref = conv_grads(x, weight, bias, stride, gemm=False)
    got = dft_conv_grads(x, weight, bias, stride, torch.float64)
    assert got[0].shape == ref[0].shape
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_dft_convolution_precision_at_the_primary_caps_shape():
    """At the paper's PrimaryCaps size the fp32 DFT convolution is as exact as fp32 conv2d, and
    its bf16 form (autocast) within 1.5% of the fp64 result, as bf16 conv2d is within 0.5%."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 20, 20, generator=g, dtype=torch.float64).relu()
    weight = 0.01 * torch.randn(256, 256, 9, 9, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(256, generator=g, dtype=torch.float64)
    exact = F.conv2d(x, weight, bias, 2)

    def error(y):
        return ((y.double() - exact).norm() / exact.norm()).item()

    xl = x.permute(0, 2, 3, 1)
    assert error(fast.conv2d_dft(xl.float(), weight.float(), bias.float(), 2, torch.float32)) < 2e-6
    bf16_direct = error(F.conv2d(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), 2))
    bf16_dft = error(fast.conv2d_dft(xl.bfloat16(), weight.float(), bias.float(), 2, torch.bfloat16))
    assert bf16_direct < 0.005 and bf16_dft < 0.015


def test_model_with_dft_convolution_trains_the_same(digit_batch):
    """A CapsuleNet with dft_conv gives the same lengths, reconstructions and gradients as with the
    direct convolution (fp32), and close ones under bf16 autocast."""
    x, labels = digit_batch
    model = small_model(w_init_std=0.5).train()
    assert model.conv_path.dft is True  # the default (CPU_DFT_CONV)
    results = {}
    for dft in (True, False):
        model.conv_path.dft = dft
        with torch.no_grad():
            lengths, recon = model(x, labels)
        results[dft] = lengths, recon, model_grads(model, x, labels)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-6)
    for name, grad in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert_bf16_grads_agree(model, x, labels, "dft", 0.03)


def cpu_fused_adam():
    """Whether this torch has Adam's fused kernel for CPU tensors (torch 2.1 has it for CUDA only)."""
    try:
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], fused=True)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("fused", [False, True])
def test_evaluation_keeps_the_weight_transform_until_the_weights_change(digit_batch, fused):
    """Without gradients the PrimaryCaps weights' DFT is computed once and reused; an optimizer
    step (also a fused one, which leaves the version counter alone) or load_state_dict makes the
    next forward use the new weights."""
    if fused and not cpu_fused_adam():
        pytest.skip("this torch has no fused Adam for CPU tensors")
    x, labels = digit_batch
    model = small_model(w_init_std=0.5)
    direct = small_model(w_init_std=0.5, dft_conv=False)

    def agree():
        direct.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(x)[0], direct(x)[0], rtol=1e-4, atol=1e-6)

    agree()
    kept = model.conv_path.cached[3]
    with torch.no_grad():
        model(x)
    assert model.conv_path.cached[3] is kept
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=fused)
    lengths, recon = model.train()(x, labels)
    cn.CapsuleLoss()(x, labels, lengths, recon).backward()
    optimizer.step()
    model.eval()
    agree()
    assert model.conv_path.cached[3] is not kept
    model.load_state_dict(small_model(seed=3, w_init_std=0.5).state_dict())
    agree()


def test_build_model_takes_the_dft_setting_from_the_config():
    """CPU_DFT_CONV (a flag) reaches the model's conv path through build_model."""
    cfg = dict(cn.default_config(), COMPILE=False, CONV1_CHANNELS=16, PRIMARY_CAPS=4)
    assert cn.build_model(cfg).conv_path.dft is True
    cfg["CPU_DFT_CONV"] = False
    assert cn.build_model(cfg).conv_path.dft is False

def test_compiled_routing_equals_eager(digit_batch):
    """fast.use_compiled_routing(): v, c, the recorded routing-logit changes and every parameter's gradient equal
    the eager ones; the compiled code ran (dynamo made a graph, nothing fell back to eager)."""
    from torch._dynamo.utils import counters

    x, labels = digit_batch
    eager, compiled = small_model(w_init_std=1.0).train(), small_model(w_init_std=1.0).train()
    fast.use_compiled_routing(compiled)
    counters.clear()
    outputs = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        model.record_routing = True
        model.logit_changes = []
        v, c = model.capsules(x)
        lengths = v.norm(dim=-1)
        (lengths[torch.arange(len(labels)), labels].sum() + c.square().sum()).backward()
        outputs[name] = (v.detach(), c.detach(), model.logit_changes[0],
                         {k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert not fast.compiled_routing(compiled).failed and counters["stats"]["unique_graphs"] >= 1
    (v0, c0, changes0, grads0), (v1, c1, changes1, grads1) = outputs["eager"], outputs["compiled"]
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-6)
    assert changes1.shape == (3,)
    torch.testing.assert_close(changes1, changes0, rtol=1e-5, atol=1e-7)
    assert grads1.keys() == grads0.keys() and "W" in grads0 and "conv1.weight" in grads0
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-4, atol=1e-6, msg=k)


MALLOC_PROBE = r"""
import resource, sys
sys.path.insert(0, sys.argv[1])
import torch
import capsule_network as cn
from capsnet import fast, runtime

def faults_per_big_tensor():
    # allocate, touch and free a 64 MB tensor: glibc's default gives it back to the OS each time
    torch.ones(16 << 20).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 << 20).sum()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5

imported = faults_per_big_tensor()
config = cn.CapsNetConfig(conv1_channels=16, primary_caps=4, decoder_hidden1=32, decoder_hidden2=64)
model = fast.use_cpu_speedups(cn.CapsuleNet(config), malloc_tuning=sys.argv[2] == "on")
with torch.no_grad():
    model(torch.rand(2, 1, 28, 28))
print(imported, faults_per_big_tensor(), runtime._malloc_tuned)
"""


@pytest.mark.parametrize("setting", ["on", "off"])
def test_capsule_net_keeps_big_buffers_mapped_on_its_first_cpu_forward(setting):
    """Importing the module changes nothing; with fast.use_cpu_speedups a CapsuleNet's first CPU
    forward calls tune_cpu_malloc() (so direct users get the speed too) unless malloc_tuning=False."""
    import subprocess
    import sys
    from conftest import ROOT
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, ROOT, setting], capture_output=True,
                         text=True, check=True).stdout.split()
    imported, after, tuned = float(out[0]), float(out[1]), out[2]
    assert imported > 10000  # 64 MB = 16,384 pages, faulted in again on every allocation
    if setting == "on":
        assert tuned == "True" and after < 100
    else:
        assert tuned == "None" and after > 10000


TRIM_PROBE = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
from capsnet import runtime

tuned = sys.argv[2] == "on" and runtime.tune_cpu_malloc()
runtime.TRIM_HEADROOM = 128 << 20
calls = [runtime.trim_cpu_malloc()]  # the first call sets the mark
big = torch.ones(96 << 20)  # 384 MB, touched, then freed: the tuned heap keeps it
del big
held = runtime.resident_bytes()
calls.append(runtime.trim_cpu_malloc())
trimmed = runtime.resident_bytes()
calls.append(runtime.trim_cpu_malloc())  # below the new mark
print(tuned, *calls, (held - trimmed) >> 20)
"""


@pytest.mark.parametrize("setting", ["on", "off"])
def test_a_tuned_heap_hands_its_free_pages_back_once_it_has_grown(setting):
    """trim_cpu_malloc (after every training step): with the allocator tuned, once the process
    holds TRIM_HEADROOM more than at the last mark, malloc_trim gives the freed memory back
    (the 40x40 CapsNet's heap grew until the kernel killed it without this); otherwise nothing."""
    import subprocess
    import sys
    from conftest import ROOT
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE, ROOT, setting], capture_output=True,
                         text=True, check=True).stdout.split()
    if setting == "on":
        assert out[:4] == ["True", "False", "True", "False"] and int(out[4]) > 300
    else:
        assert out[1:4] == ["False", "False", "False"] and int(out[4]) < 50


def test_fused_adam_makes_the_same_update_as_plain_adam(digit_batch):
    """build_optimizer's Adam is the fused one where this torch has it for the CPU, else the plain
    one (torch 2.1); either way it steps the weights like torch's plain Adam."""
    images, labels = digit_batch
    cfg = dict(cn.default_config(), CONV1_CHANNELS=16, PRIMARY_CAPS=4, LR=1e-3)
    def flat(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    weights = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = cn.build_model(cfg)
        start = flat(model)
        opt = cn.build_optimizer(model, cfg) if fused else torch.optim.Adam(model.parameters(), lr=1e-3)
        if fused:
            assert bool(opt.defaults.get("fused")) is cpu_fused_adam()
        for _ in range(3):
            opt.zero_grad()
            lengths, recon = model(images, labels)
            cn.CapsuleLoss()(images, labels, lengths, recon).backward()
            opt.step()
        weights.append(flat(model))
    moved = (weights[1] - start).norm()
    assert moved > 0
    assert (weights[0] - weights[1]).norm() <= 1e-4 * moved
