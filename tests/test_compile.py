"""COMPILE: the capsule layer's compiled layout, the "auto" choice between the compiled and the
eager capsule layer, its flags, and what a run records and prints about it."""

import os
import re

import pytest
import torch

from conftest import cn, copy_run, describe, load_pt, read_rows, run_main, train_args, whole_step_arms
from capsnet import fast, runtime  # noqa: E402


def test_children_last_layout_is_the_same_routing():
    """factored_routing(children_last=True), the layout the compiled version runs, gives the values
    and gradients of the plain layout and of the literal Procedure 1 over u_hat (fp64)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(10, 24, 16, 8, dtype=torch.float64, generator=g).requires_grad_()
    u = cn.squash(torch.randn(3, 24, 8, dtype=torch.float64, generator=g)).requires_grad_()
    results = []
    for children_last in (False, True):
        v, c, changes = cn.factored_routing(W, u, 3, True, children_last=children_last)
        grads = torch.autograd.grad((v ** 2).sum() + (c ** 3).sum() + changes.sum(), (W, u))
        results.append((v, c, changes, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    u_hat = torch.einsum("jied,bid->bije", W, u)
    v_ref, c_ref = cn.dynamic_routing(u_hat, 3)
    torch.testing.assert_close(results[1][0], v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[1][1], c_ref, rtol=1e-10, atol=1e-12)


class FakeModel:
    """Records which routing each step ran (fast.use_compiled_routing sets `routing`); its compiled
    routing is a stand-in whose compile may have failed."""

    def __init__(self, failed=False):
        self.used = []
        self.eager_routing = lambda *args: None
        fast._COMPILED[self] = type("Compiled", (), {"failed": failed})()  # what use_compiled_routing would make

    def routing_to_compile(self):
        return self.eager_routing

    @property
    def routing(self):
        return None

    @routing.setter
    def routing(self, fn):
        self.used.append("eager" if fn is self.eager_routing else "compiled")


class FakeClock:
    """CompileChoice.clock: a step lasts seconds[kind] of the layer last chosen."""

    def __init__(self, model, seconds):
        self.model, self.seconds, self.now, self.started = model, seconds, 0.0, False

    def __call__(self):
        self.started = not self.started
        if not self.started:  # the end of a step
            self.now += self.seconds[self.model.used[-1]]
        return self.now


def run_steps(choice, n):
    for _ in range(n):
        choice.before_step()
        choice.after_step()


@pytest.mark.parametrize("seconds, expected", [({"compiled": 0.3, "eager": 0.5}, "compiled"),
                                               ({"compiled": 0.9, "eager": 0.5}, "eager")])
def test_auto_times_both_layers_in_turn_and_keeps_the_faster(capsys, seconds, expected):
    """auto: compiled twice and eager once untimed, then 4 timed steps of each in turn; the one
    with the faster median is used from then on, announced in one line."""
    model = FakeModel()
    choice = fast.CompileChoice(model, torch.device("cpu"), "auto")
    choice.clock = FakeClock(model, seconds)
    run_steps(choice, 11)
    assert model.used == ["compiled", "compiled", "eager"] + ["compiled", "eager"] * 4 + [expected]
    assert choice.choice == expected
    assert choice.times == {k: [pytest.approx(seconds[k])] * 4 for k in ("compiled", "eager")}
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"compile auto: the {expected} capsule layer is faster")
    run_steps(choice, 5)  # decided: no more switching, nothing printed
    assert len(model.used) == 12 and capsys.readouterr().out == ""


def test_auto_resumes_an_unfinished_trial_where_it_stopped():
    """The state saved in a checkpoint mid-trial continues the same schedule in a new run."""
    seconds = {"compiled": 0.25, "eager": 0.5}  # exact in binary: the summed clock times compare equal
    whole, first = FakeModel(), FakeModel()
    uninterrupted = fast.CompileChoice(whole, torch.device("cpu"), "auto")
    uninterrupted.clock = FakeClock(whole, seconds)
    run_steps(uninterrupted, 11)
    before = fast.CompileChoice(first, torch.device("cpu"), "auto")
    before.clock = FakeClock(first, seconds)
    run_steps(before, 6)
    state = before.state()
    assert state["choice"] is None and state["step"] == 6
    second = FakeModel()
    after = fast.CompileChoice(second, torch.device("cpu"), "auto", state)
    after.clock = FakeClock(second, seconds)
    run_steps(after, 5)
    assert first.used + second.used == whole.used
    assert after.choice == uninterrupted.choice == "compiled" and after.times == uninterrupted.times


def test_forced_settings_and_a_decided_state_run_no_trial(capsys):
    """--compile / --no-compile use that layer from the start; a recorded choice is kept."""
    for setting, state, expected in ((True, None, "compiled"), (False, None, "eager"),
                                     ("auto", {"choice": "eager", "step": 11, "times": {}}, "eager")):
        model = FakeModel()
        choice = fast.CompileChoice(model, torch.device("cpu"), setting, state)
        choice.clock = FakeClock(model, {"compiled": 1.0, "eager": 2.0})
        run_steps(choice, 12)
        assert model.used == [expected] and choice.choice == expected
    assert capsys.readouterr().out == ""


def test_auto_falls_back_to_eager_when_compiling_failed(capsys):
    model = FakeModel(failed=True)
    choice = fast.CompileChoice(model, torch.device("cpu"), "auto")
    choice.clock = FakeClock(model, {"compiled": 0.1, "eager": 0.5})
    run_steps(choice, 11)
    assert choice.choice == "eager" and model.used[-1] == "eager"
    assert "torch.compile failed" in capsys.readouterr().out


def test_compile_flag_values():
    parser = cn.build_parser()
    for argv, value in (([], "auto"), (["--compile"], True), (["--no-compile"], False),
                        (["--compile", "off"], False), (["--compile", "on"], True), (["--compile", "auto"], "auto"),
                        (["--compile", "step"], "step")):
        assert cn.configure(cn.flags_given(parser.parse_args(argv)))[0]["COMPILE"] == value, argv
    done = run_main(["--compile", "sometimes"])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "must be auto, on, off or step" in lines[0], describe(done)


def test_auto_run_records_its_choice_and_a_resumed_run_keeps_it(tiny_mnist, tmp_path):
    """A tiny run in the default mode (auto): 10 steps an epoch, so epoch 1 is all trial and the
    choice falls in epoch 2; one line says it; the metrics rows and the checkpoint record it; a
    resumed run keeps it without a new trial. No compiler chatter reaches stderr."""
    run = str(tmp_path / "run")
    done = run_main(train_args(tiny_mnist["root"], run, "--compile", "auto", epochs=2))
    assert done.returncode == 0, describe(done)
    announced = re.findall(r"^compile auto: the (compiled|eager) capsule layer is faster", done.stdout, re.M)
    assert len(announced) == 1, describe(done)
    rows = read_rows(run)
    assert [r["compile"] for r in rows] == ["trial", announced[0]]
    ckpt = load_pt(os.path.join(run, "last.pt"))
    assert ckpt["compile_choice"]["choice"] == announced[0] and ckpt["compile_choice"]["step"] == 11
    assert ckpt["config"]["COMPILE"] == "auto"
    for noise in ("No CUDA runtime", "cpp_extension", "torch._dynamo", "torch._inductor"):
        assert noise not in done.stderr, describe(done)
    resumed = run_main(["--resume", os.path.join(copy_run(run, tmp_path / "again"), "last.pt"), "--epochs", "3",
                          "--no-visdom"])
    assert resumed.returncode == 0, describe(resumed)
    assert "compile auto" not in resumed.stdout
    assert read_rows(str(tmp_path / "again"))[-1]["compile"] == announced[0]


class FakeNetwork:
    """BatchLoss's switch for the whole compiled step: marks the model's last step as "step"."""

    def __init__(self, model):
        self.model, self.whole_step = model, None

    def use_whole_step(self, on=True):
        if on:
            self.model.used[-1] = "step"


def test_auto_on_cuda_also_times_the_whole_step(capsys, monkeypatch):
    """On CUDA, auto adds the whole compiled step to the trial (twice untimed, then in turn) and
    keeps it when it is the fastest; the CPU's trial stays the two capsule layers."""
    monkeypatch.setattr(fast, "sync", lambda device: None)
    model = FakeModel()
    choice = fast.CompileChoice(model, torch.device("cuda"), "auto", network=FakeNetwork(model))
    choice.clock = FakeClock(model, {"compiled": 0.3, "eager": 0.5, "step": 0.1})
    run_steps(choice, 17)
    assert model.used == ["compiled", "compiled", "eager", "step", "step"] + ["compiled", "eager", "step"] * 4 + ["step"]
    assert choice.choice == "step" and choice.times["step"] == [pytest.approx(0.1)] * 4
    assert capsys.readouterr().out.startswith("compile auto: the whole compiled step is faster here (median "
                                              "training step 0.300 s compiled, 0.500 s eager, 0.100 s step")
    cpu = fast.CompileChoice(FakeModel(), torch.device("cpu"), "auto", network=FakeNetwork(model))
    assert "step" not in cpu.schedule and set(cpu.times) == {"compiled", "eager"}


def test_auto_under_torchrun_leaves_the_whole_step_out_of_its_trial(monkeypatch):
    """On CUDA under torchrun (a world of 2), auto times the two capsule layers only: the whole step
    would run there without CUDA graphs, DDP's hooks between its graphs; --compile step still
    forces it."""
    monkeypatch.setattr(fast, "sync", lambda device: None)
    model, world = FakeModel(), runtime.Distributed({"WORLD_SIZE": "2", "RANK": "0"})
    choice = fast.CompileChoice(model, torch.device("cuda"), "auto", dist=world, network=FakeNetwork(model))
    assert "step" not in choice.schedule and set(choice.times) == {"compiled", "eager"}
    forced = fast.CompileChoice(model, torch.device("cuda"), "step", dist=world, network=FakeNetwork(model))
    assert forced.choice == "step"


@pytest.mark.parametrize("dtype, loss_rtol, rtol", [(None, 1e-6, 1e-5), (torch.bfloat16, 1e-4, 3e-2)])
def test_whole_compiled_step_trains_as_the_eager_one(dtype, loss_rtol, rtol):
    """COMPILE = "step" on the CPU: the same losses step after step, the same gradients and the
    same change of the weights after three Adam steps as the eager model, in fp32 to float
    rounding and under bf16 autocast (the default mode) to bf16 rounding."""
    arms = whole_step_arms(dtype)
    (eager_losses, eager_grads, eager_change), (losses, grads, change) = arms["eager"], arms["step"]
    assert losses == pytest.approx(eager_losses, rel=loss_rtol)
    for a, b in zip(grads, eager_grads):
        assert (a - b).norm() <= rtol * b.norm() + 1e-12
    assert (change - eager_change).norm() <= rtol * eager_change.norm()


def test_whole_step_run_records_step_and_the_test_passs_routing(tiny_mnist, tmp_path):
    """--compile step: a tiny run trains through the whole compiled step (no fallback, no compiler
    chatter); every metrics row says "step" and carries the routing diagnostics of the test pass;
    the checkpoint keeps the choice and a resumed run goes on with it."""
    run = str(tmp_path / "run")
    done = run_main(train_args(tiny_mnist["root"], run, "--compile", "step", epochs=1))
    assert done.returncode == 0 and "torch.compile failed" not in done.stderr, describe(done)
    for noise in ("No CUDA runtime", "torch._dynamo", "torch._inductor", "lru_cache"):
        assert noise not in done.stderr, describe(done)
    rows = read_rows(run)
    assert [r["compile"] for r in rows] == ["step"]
    assert len(rows[0]["routing_logit_change"]) == 3 and all(c > 0 for c in rows[0]["routing_logit_change"])
    assert load_pt(os.path.join(run, "last.pt"))["compile_choice"]["choice"] == "step"
    resumed = run_main(["--resume", os.path.join(run, "last.pt"), "--epochs", "2", "--no-visdom"])
    assert resumed.returncode == 0, describe(resumed)
    assert [r["compile"] for r in read_rows(run)] == ["step", "step"]
