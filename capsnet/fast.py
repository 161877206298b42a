"""The same mathematics, computed faster: the PrimaryCaps convolution on the CPU (one im2col GEMM
for the weight gradient; small DFTs for the whole convolution), glibc's allocator settings, and
the compiled-or-eager choice for the capsule layer (results/README.md measures each)."""

import contextlib
import functools
import io
import logging
import math
import sys
import time
import warnings
import weakref

import torch
import torch.nn.functional as F

from capsnet.runtime import Distributed, is_out_of_memory, sync, tune_cpu_malloc


def use_cpu_speedups(model, dft_conv=True, gemm_weight_grad=True, malloc_tuning=True):
    """The CPU speed paths for `model` (the same values, computed faster; results/README.md): a
    CapsuleNet's ReLU(Conv1) + PrimaryCaps convolution through small DFTs (dft_conv) or with the
    weight gradient as one GEMM (gemm_weight_grad), through its public `conv_path`; and glibc's
    allocator tuned for this process (malloc_tuning) at the first CPU forward. The script's
    build_model calls it with CPU_DFT_CONV, CPU_GEMM_WEIGHT_GRAD and CPU_MALLOC_TUNING; a script of
    your own may too. Models without a conv_path (Efficient-CapsNet, the CNN baselines) are left as
    they are (the trainer's setup_process tunes the allocator for every model)."""
    if hasattr(model, "conv_path"):
        model.conv_path = CpuConvPath(dft_conv, gemm_weight_grad, malloc_tuning)
    return model


class CpuConvPath:
    """ReLU(Conv1) then the PrimaryCaps convolution of a CapsuleNet on CPU images (B, C, H, W),
    computed as set: through small DFTs (dft), or with the weight gradient as one GEMM (gemm, in
    training) -> (B, T*D, G, G); None where neither applies (the model then convolves plainly).
    The DFT of the PrimaryCaps weights is kept between evaluation batches while they hold the same
    values (compared with a copy: fused optimizers update them in place without a version bump)."""

    def __init__(self, dft=True, gemm=True, malloc_tuning=True):
        self.dft, self.gemm, self.malloc_tuning = dft, gemm, malloc_tuning
        self.cached = None  # (weight, dtype, its values, its DFT)

    def __call__(self, model, images):
        if self.malloc_tuning:
            tune_cpu_malloc()  # once per process
        weight, bias, stride = model.primary_weight(), model.primary.bias, model.primary.stride[0]
        if self.dft:
            # Given channels-last input (for one channel: the same memory, with channels-last
            # strides), Conv1 writes channels-last: the layout conv2d_dft reads without a transpose.
            B, C, H, W = images.shape
            if C == 1:
                images = images.contiguous().as_strided(images.shape, (H * W, 1, W, 1))
            else:
                images = images.contiguous(memory_format=torch.channels_last)
            x = model.conv1_activation(model.conv1(images)).permute(0, 2, 3, 1)  # (B, 20, 20, 256)
            return conv2d_dft(x, weight, bias, stride, x.dtype, self.weight_f(model, x.dtype))  # (B, T*D, 6, 6)
        if self.gemm and torch.is_grad_enabled() and model.primary.weight.requires_grad:
            x = model.conv1_activation(model.conv1(images))  # (B, 256, 20, 20)
            dtype = x.dtype  # bf16 under autocast
            return StridedConvGemmGrad.apply(x, weight.to(dtype), bias.to(dtype), stride)  # (B, T*D, 6, 6)
        return None

    def weight_f(self, model, dtype):
        """dft_weight of the PrimaryCaps weights when no gradient flows to them (evaluation), from the
        cache while they are unchanged; None when it must be in the graph."""
        w = model.primary.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return None
        with torch.no_grad():
            cached = self.cached
            if cached is None or cached[0] is not w or cached[1] != dtype or not torch.equal(cached[2], w):
                self.cached = cached = (w, dtype, w.detach().clone(),
                                        dft_weight(model.primary_weight(), model.primary.stride[0], model.grid, dtype))
        return cached[3]


_COMPILED = weakref.WeakKeyDictionary()  # model -> the CompiledOrEager version of its routing


def use_compiled_routing(model, compiled=True):
    """Route `model`'s capsules with torch.compile's version of its routing (made at the first call,
    from model.routing_to_compile()), or, compiled=False, with its eager routing again. Only the
    capsule part is compiled: it fuses the memory-bound routing ops, while the convolutions stay
    on the vendor kernels (compiling them made CPU training slower). A model without routing (the CNN
    baselines) has nothing to compile and is left as it is."""
    if not hasattr(model, "routing_to_compile"):
        return
    if compiled and model not in _COMPILED:
        _COMPILED[model] = CompiledOrEager(model.routing_to_compile())
    model.routing = _COMPILED[model] if compiled else model.eager_routing


def compiled_routing(model):
    """The CompiledOrEager routing use_compiled_routing made for `model`, or None."""
    return _COMPILED.get(model)


def model_to_device(model, cfg, device):
    """The model on `device`, channels-last and with the compiled routing if cfg asks."""
    model = model.to(device)
    if cfg["CHANNELS_LAST"]:
        model = model.to(memory_format=torch.channels_last)
    if cfg["COMPILE"] is True:
        use_compiled_routing(model)
    return model


class CompiledOrEager:
    """torch.compile(fn, mode=mode), falling back to fn with one warning if compiling fails (no
    compiler, unsupported platform). Compilation happens at the first call of each new input kind."""

    def __init__(self, fn, mode=None):
        # On machines without CUDA, torch's C++ extension helper says "No CUDA runtime is found"
        # when inductor first imports it: noise for a CPU user. Imported here quietly; its errors
        # still show.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                import torch.utils.cpp_extension  # noqa: F401
            except Exception:  # then inductor meets the same error later and CompiledOrEager reports it
                pass
        # dynamo traces through the lru_cache of dft_matrices (its values are constants): said once, harmless
        warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
        self.eager = fn
        self.fn = torch.compile(fn, mode=mode)

    @property
    def failed(self):
        return self.fn is self.eager

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.fn(*args, **kwargs)
        except Exception as e:  # torch._dynamo / inductor raise many types
            if is_out_of_memory(e):  # the step does not fit: no compile failure, and eager would not fit either
                raise
            first = (str(e).strip().splitlines() or [""])[0][:160]
            print(f"warning: torch.compile failed ({type(e).__name__}: {first}); running eagerly",
                  file=sys.stderr)
            self.fn = self.eager
            return self.eager(*args, **kwargs)


class StridedConvGemmGrad(torch.autograd.Function):
    """conv2d (no padding) whose weight gradient is computed as one im2col GEMM.

    Same mathematics as F.conv2d; on CPUs oneDNN's weight-gradient kernel for the 256->256 9x9
    stride-2 PrimaryCaps convolution runs far below the matrix units' speed, and this is the
    largest single cost of a training step (measured in results/README.md)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride):
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return F.conv2d(x, weight, bias, stride)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        s = ctx.stride
        O, C, K, _ = weight.shape
        B, _, H, W = x.shape
        OH, OW = grad.shape[2:]
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [s, s], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        xs = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C); a copy unless x is channels_last
        # every K x K x C input patch as one row: (B*OH*OW, K*K*C), ordered like a channels_last weight
        patches = xs.as_strided((B, OH, OW, K, K, C), (H * W * C, s * W * C, s * C, W * C, C, 1))
        patches = patches.reshape(B * OH * OW, K * K * C)
        g = grad.permute(1, 0, 2, 3).reshape(O, B * OH * OW)  # (O, B*OH*OW)
        grad_weight = (g @ patches).view(O, K, K, C).permute(0, 3, 1, 2)  # (O, C, K, K)
        grad_bias = grad.sum((0, 2, 3))
        return grad_input, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


@functools.lru_cache(maxsize=None)
def dft_matrices(kernel, stride, out, device, dtype):
    """The real matrices conv2d_dft multiplies by, computed in fp64, returned in `dtype`.

    n = stride * (out - 1) + kernel is the smallest DFT size whose circular correlation has no
    wrap-around at the outputs used. Frequencies: k1 in 0..n-1 along rows, k2 in 0..n//2 along
    columns (the input is real, so the other half of k2 follows by conjugate symmetry); a complex
    value is stored as (real, imaginary), index `reim` below; w = exp(-2 pi i / n).
      d1 (k2 reim, col):         X1[row, k2] = sum_col x[row, col] w^(k2 col)   (along columns)
      d2 (k1 reim, reim row):    X[k1, k2] = sum_row X1[row, k2] w^(k1 row)     (along rows)
      ew (k2 k1 reim, K*K):      Wf[k1, k2] = sum_ij weight[i, j] w^(k1 i + k2 j)
      inv_rows (reim p, k1 reim): Y1[p, k2] = sum_k1 Z[k1, k2] w^(-k1 stride p)  (only the rows used)
      inv_cols (q, k2 reim):     y[p, q] = Re sum_k2 a_k2 Y1[p, k2] w^(-k2 stride q) / n^2,
    with a_k2 = 2 for the k2 whose conjugates were left out, else 1.
    """
    f64 = torch.float64
    n = stride * (out - 1) + kernel
    half = n // 2 + 1
    t = torch.arange(n, dtype=f64)
    k2 = torch.arange(half, dtype=f64)
    angle = 2 * math.pi * k2[:, None] * t / n  # (k2, column)
    d1 = torch.stack([angle.cos(), -angle.sin()], 1).reshape(2 * half, n)
    angle = 2 * math.pi * t[:, None] * t / n  # (k1, row)
    cos, sin = angle.cos(), angle.sin()
    d2 = torch.stack([torch.cat([cos, sin], 1), torch.cat([-sin, cos], 1)], 1).reshape(2 * n, 2 * n)
    tap = torch.arange(kernel, dtype=f64)
    angle = 2 * math.pi * (k2[:, None, None, None] * tap + t[:, None, None] * tap[:, None]) / n  # (k2, k1, i, j)
    ew = torch.stack([angle.cos(), -angle.sin()], 2).reshape(2 * half * n, kernel * kernel)
    used = torch.arange(out, dtype=f64) * stride
    angle = 2 * math.pi * used[:, None] * t / n  # (p, k1)
    cos, sin = angle.cos(), angle.sin()
    inv_rows = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)]).reshape(2 * out, 2 * n)
    a = torch.full((half,), 2.0, dtype=f64)
    a[0] = 1.0
    if n % 2 == 0:
        a[-1] = 1.0  # the Nyquist column is its own conjugate
    angle = 2 * math.pi * used[:, None] * k2 / n  # (q, k2)
    inv_cols = (torch.stack([angle.cos(), -angle.sin()], -1) * a[:, None]).reshape(out, 2 * half) / n ** 2
    return tuple(m.to(device, dtype) for m in (d1, d2, ew, inv_rows, inv_cols))


def dft_weight(weight, stride, out, dtype):
    """The weights' DFTs for conv2d_dft: (O, C, K, K) -> (frequencies, 2 O, C), rows (reim, o)."""
    O, C, K, _ = weight.shape
    ew = dft_matrices(K, stride, out, weight.device, dtype)[2]
    return (ew @ weight.reshape(O * C, K * K).to(dtype).t()).reshape(ew.shape[0] // 2, 2 * O, C)


def conv2d_dft(x, weight, bias, stride, dtype, weight_f=None):
    """F.conv2d(x, weight, bias, stride), no padding, computed in the frequency domain.

    x is given channels-last, (B, H, W, C); returns (B, O, OH, OW) as a permuted view. The same
    mathematics as the direct convolution (tests compare them in fp64 and fp32): by the correlation
    theorem each output is the inverse DFT of X * conj(Wf), summed over input channels. On the CPU
    the 256->256 9x9 stride-2 PrimaryCaps convolution then costs, per frequency, one (2 O x C) by
    (C x 2 B) matrix product: about 3.3x fewer multiply-adds than the direct convolution. All
    transforms are small real matrix products, in `dtype` (bf16 under autocast, else fp32), in
    layouts that need no transposes; only the stride-th outputs are transformed back. `weight_f`
    is dft_weight(weight, ...) when the caller has it cached (evaluation).
    """
    B, H, _, C = x.shape
    O, _, K, _ = weight.shape
    out = (H - K) // stride + 1
    n = stride * (out - 1) + K
    half = n // 2 + 1
    d1, d2, _, inv_rows, inv_cols = dft_matrices(K, stride, out, x.device, dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xt = x[:, :n, :n].permute(2, 1, 0, 3).to(dtype).reshape(n, n * B * C)  # (column, row, b, c)
        x1 = (d1 @ xt).reshape(half, 2 * n, B * C)  # (k2, (reim, row), (b, c))
        xf = (d2 @ x1).reshape(half * n, 2 * B, C)  # (frequency (k2, k1), (reim, b), c)
        if weight_f is None:
            weight_f = dft_weight(weight, stride, out, dtype)  # (frequency, (reim, o), c)
        # per frequency, every product of a real or imaginary part of Wf with one of X
        p = torch.bmm(weight_f, xf.transpose(1, 2)).reshape(half * n, 2, O, 2, B)
        z_re = p[:, 0, :, 0] + p[:, 1, :, 1]  # Re(X conj(Wf)) = Xr Wr + Xi Wi, (frequency, o, b)
        z_im = p[:, 0, :, 1] - p[:, 1, :, 0]  # Im(X conj(Wf)) = Xi Wr - Xr Wi
        z = torch.stack([z_re, z_im], 1).reshape(half, 2 * n, O * B)  # (k2, (k1, reim), (o, b))
        y1 = (inv_rows @ z).reshape(2 * half, out * O * B)  # ((k2, reim), (p, o, b))
        y = (inv_cols @ y1).reshape(out, out, O, B) + bias.to(dtype)[:, None]  # (q, p, o, b)
    return y.permute(3, 2, 1, 0)


def not_a_profiler_note(record):
    """Logging filter: DDP's forward opens a profiler range that dynamo skips, saying so on every rank."""
    return "Profiler record function" not in record.getMessage()


class WholeStep:
    """COMPILE = "step": the forward pass and loss of a training batch (BatchLoss.forward_loss)
    compiled as one graph, whose backward AOTAutograd compiles with it; on CUDA with CUDA graphs
    (mode "reduce-overhead"), so that a step is a few graph launches instead of hundreds of kernel
    launches. Inside it the capsule layer is the plain function (traced into the graph) and no
    routing diagnostics are recorded (the trainer records them on the test pass instead). Adam
    stays outside: fused, it is already one multi-tensor kernel, and compiled it would bake the
    learning rate, which decays every epoch, into its graph. Under torchrun no CUDA graphs (DDP's
    gradient hooks run between the graphs)."""

    def __init__(self, model, fn, graphs):
        self.model, self.graphs = model, graphs
        self.compiled = CompiledOrEager(fn, "reduce-overhead" if graphs else None)
        use_compiled_routing(model)  # the compiled routing serves the test pass; its .eager is the plain one
        self.layer = compiled_routing(model).eager
        logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(not_a_profiler_note)

    @property
    def failed(self):
        return self.compiled.failed

    def __call__(self, *args):
        model = self.model
        saved = model.routing, model.record_routing
        model.routing, model.record_routing = self.layer, False
        try:
            if self.graphs:  # the outputs of the previous step are no longer read
                torch.compiler.cudagraph_mark_step_begin()
            loss, lengths = self.compiled(*args)
        finally:
            model.routing, model.record_routing = saved
        return loss, lengths.detach().clone()  # a CUDA graph's outputs are overwritten by its next run


class CompileChoice:
    """How the trainer runs a training step: the compiled capsule layer ("compiled"), the eager one
    ("eager"), or the whole step compiled ("step", WholeStep). COMPILE = True, False or "step"
    forces one; COMPILE = "auto" decides by measurement: the first training steps run each kind
    once or twice untimed (the compiled ones compile in their first), then the kinds in turn,
    TIMED steps each, timed; the one with the fastest median step is kept for the rest of the run.
    Those steps are real training steps (the same mathematics every way). "auto" times the whole
    step on CUDA only: on the 2-core CPU it trained at 0.69x the eager speed, 0.59x the compiled
    layer's (results/README.md), after tens of seconds of compiling; and not under torchrun, where
    DDP's gradient hooks run between its graphs and it runs without CUDA graphs (untimed there:
    "step" is still the user's to ask for). The choice is printed in one
    line, recorded in each metrics row and in the checkpoint, and a resumed run keeps it (or
    continues an unfinished trial), so that it trains exactly as the uninterrupted run. Why measure: how fast inductor's code is depends on
    the torch release and the machine, and a faster default on one machine can be the slower one
    on another (results/README.md). `network` is the trainer's BatchLoss (the whole step's switch)."""

    WARMUP = ("compiled", "compiled", "eager")
    TIMED = 4
    NAMES = {"compiled": "compiled capsule layer", "eager": "eager capsule layer", "step": "whole compiled step"}

    def __init__(self, model, device, setting, state=None, dist=None, network=None):
        self.model, self.device, self.dist, self.network = model, device, dist or Distributed({}), network
        whole = device.type == "cuda" and network is not None and not self.dist.enabled
        kinds = ["compiled", "eager"] + (["step"] if whole else [])
        warmup = list(self.WARMUP) + ["step", "step"] * ("step" in kinds)
        self.schedule, self.warmup = warmup + kinds * self.TIMED, len(warmup)
        self.step, self.times, self.choice = 0, {k: [] for k in kinds}, None
        self.current, self.started, self.clock = None, 0.0, time.perf_counter
        if not hasattr(model, "routing_to_compile"):  # no routing (the CNN baselines): nothing to compile
            self.choice = "eager"
        elif setting != "auto":
            self.choice = {True: "compiled", False: "eager", "step": "step"}[setting]
        elif state:  # resuming: the recorded choice, or the trial where it stopped
            self.choice, self.step = state["choice"], state["step"]
            self.times.update((k, list(v)) for k, v in state["times"].items())
        if self.choice is not None:
            self.use(self.choice)

    def use(self, kind):
        use_compiled_routing(self.model, kind != "eager")  # "step": the compiled routing serves the test pass
        if self.network is not None:
            self.network.use_whole_step(kind == "step")

    def state(self):
        return {"choice": self.choice, "step": self.step, "times": self.times}

    def before_step(self):
        if self.choice is None:
            self.current = self.schedule[self.step]
            self.use(self.current)
            sync(self.device)
            self.started = self.clock()

    def after_step(self):
        if self.choice is None:
            sync(self.device)
            seconds = self.clock() - self.started
            if self.step >= self.warmup:
                self.times[self.current].append(seconds)
            self.step += 1
            if self.step == len(self.schedule):
                self.decide()

    def decide(self):
        median = {k: sorted(t)[len(t) // 2] for k, t in self.times.items()}
        whole = self.network.whole_step if self.network is not None else None
        failed = {"compiled": compiled_routing(self.model).failed, "step": whole is not None and whole.failed}
        usable = {k: m for k, m in median.items() if not failed.get(k)}
        self.choice = min(usable, key=usable.get)  # the first of equals: compiled before eager
        why = ", ".join(f"{m:.3f} s {k}" for k, m in median.items())
        why = "torch.compile failed" if len(usable) < len(median) else f"median training step {why}"
        self.choice = self.dist.from_main(self.choice)  # under torchrun: rank 0's measurement for all
        self.use(self.choice)
        print(f"compile auto: the {self.NAMES[self.choice]} is faster here ({why}, torch "
              f"{torch.__version__}); it is used from now on", flush=True)
