"""The examples run (tiny budgets) and do what they say."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_hand_written_loop_improves_every_adapter(cache):
    out = _load("hand_written_loop").main(["--iterations", "60", "--cache-dir", cache, "--teacher-steps", "600"])
    assert set(out) == {"DiffInstruct", "DMD2", "SiD"}
    for name, (before, after) in out.items():
        assert after < 0.6 * before, (name, before, after)


def test_disback_in_your_loop_switches_to_the_teacher(cache):
    out = _load("disback_in_your_loop").main(["--iterations", "40", "--degradation-steps", "50",
                                              "--cache-dir", cache, "--teacher-steps", "600"])
    assert out["DMD2"] < 1.0 and out["DMD2 + DisBack"] < 1.0  # both far below the one-step start (~1.3)
    nodes = [n for _, n in out["switches"]]
    assert nodes == [4, 3, 2, 1, 0]  # every switch happened, ending on the teacher


def test_diffusers_wiring_runs():
    logs = _load("diffusers_text_to_image").main(iterations=2)
    assert {"generator/loss", "generator/score_gap", "critic/dsm"} <= set(logs)


WRAPS = [("wrap_dmd2_loop", ["--iterations", "25", "--record-steps", "10", "--teacher-steps", "30"], 10),
         ("wrap_edm_loop", ["--iterations", "12", "--record-steps", "10", "--teacher-steps", "30"], 10),
         ("wrap_diffusers_lora", ["--iterations", "12", "--record-steps", "10"], 15)]


@pytest.mark.parametrize("name,args,limit", WRAPS)
def test_wrapped_user_loops_switch_their_own_teacher(name, args, limit, monkeypatch):
    """In each user's loop, after every switch the user's own teacher module gives node k's recorded
    probe outputs, the last node is the teacher bit-exactly, and the change is at most `limit` lines."""
    from disback_core.attach import Attachment

    seen, step = [], Attachment.step

    def checked_step(self, stat=None):
        switched = step(self, stat)
        if switched:
            seen.append((self.node, self.verify()))
        return switched

    monkeypatch.setattr(Attachment, "step", checked_step)
    show = _load("show_diff")
    mod = show.load_example(name)
    out = mod.main(args)
    assert [n for _, n in out["switches"]] == [4, 3, 2, 1, 0]
    assert [n for n, _ in seen] == [3, 2, 1, 0]
    assert max(e for _, e in seen) < 1e-5 and seen[-1][1] == 0.0
    assert out["node0_exact"]  # the user's teacher holds its original weights bit-exactly at node 0
    probe = out["attachment"].trajectory.probe
    gaps = [float((o - probe.outputs[0]).abs().max()) for o in probe.outputs[1:]]
    assert min(gaps) > 1e-4, gaps  # the nodes really differ from the teacher: a switch is visible
    _, added, _ = show.changed_lines(mod.PLAIN, mod.DISBACK)
    assert added <= limit


def test_wrapped_flow_loop_switches_the_raw_transformer(monkeypatch):
    """The SD3 flow-matching DMD2 loop (raw ``SD3Transformer2DModel`` keyword calls, the user's own
    flow-matching fake-score loss): after every switch the user's transformer gives node k's recorded
    probe outputs through its own keyword call, node 0 is the teacher bit-exactly, 10 lines change."""
    from disback_core.attach import Attachment

    seen, step = [], Attachment.step

    def checked_step(self, stat=None):
        switched = step(self, stat)
        if switched:
            seen.append((self.node, self.verify()))
        return switched

    monkeypatch.setattr(Attachment, "step", checked_step)
    show = _load("show_diff")
    mod = show.load_example("wrap_flow_loop")
    out = mod.main(["--iterations", "16", "--record-steps", "10"])
    assert [n for _, n in out["switches"]] == [4, 3, 2, 1, 0]
    assert [n for n, _ in seen] == [3, 2, 1, 0]
    assert max(e for _, e in seen) < 1e-5 and seen[-1][1] == 0.0
    assert out["node0_exact"]  # the user's transformer holds its original weights bit-exactly at node 0
    att = out["attachment"]
    assert att.call is mod.sd3_call  # the probe runs the transformer's own keyword call
    probe = att.trajectory.probe
    assert set(probe.cond) == {"encoder_hidden_states", "pooled_projections"}
    assert float(probe.sigma.min()) > 0 and float(probe.sigma.max()) < 1000  # timesteps 1000 t, not sigmas
    gaps = [float((o - probe.outputs[0]).abs().max()) for o in probe.outputs[1:]]
    assert min(gaps) > 1e-4, gaps  # the nodes really differ from the teacher: a switch is visible
    _, added, _ = show.changed_lines(mod.PLAIN, mod.DISBACK)
    assert added == 10


def test_one_base_lora_loop_serves_the_path_beside_the_generator(monkeypatch):
    """The LCM-LoRA layout (one base UNet, the generator a peft adapter on it, the teacher the base with
    the adapter disabled): after every switch the user's own ``unet`` gives node k's recorded probe
    outputs inside ``path.target()``, node 0 is the bare base bit for bit, a switch leaves the
    generator's outputs bit-identical, the base's weights are never written, and 15 lines change."""
    import torch

    from disback_core.shared_base import SharedBasePath

    seen, step = [], SharedBasePath.step
    gen_in = (torch.randn(2, 4, 8, 8), torch.full((2,), 999), torch.randn(2, 7, 12))

    def checked_step(self, stat=None):
        def generator():
            with torch.no_grad():
                return self.base(gen_in[0], gen_in[1], encoder_hidden_states=gen_in[2]).sample

        before = generator()
        switched = step(self, stat)
        if switched:
            seen.append((self.node, self.verify()))
            assert torch.equal(generator(), before)  # the switch wrote only the path adapter
        return switched

    monkeypatch.setattr(SharedBasePath, "step", checked_step)
    show = _load("show_diff")
    mod = show.load_example("wrap_lora_generator")
    out = mod.main(["--iterations", "12", "--record-steps", "10"])
    assert [n for _, n in out["switches"]] == [4, 3, 2, 1, 0]
    assert [n for n, _ in seen] == [3, 2, 1, 0]
    assert max(e for _, e in seen) < 1e-5 and seen[-1][1] == 0.0
    assert out["node0_exact"]  # the base (the teacher, adapters off) holds its original weights bit-exactly
    path = out["attachment"]
    assert path.generator_adapter == "default" and all(not p.requires_grad for p in path.adapter_parameters())
    probe = path.trajectory.probe
    gaps = [float((o - probe.outputs[0]).abs().max()) for o in probe.outputs[1:]]
    assert min(gaps) > 1e-4, gaps  # the nodes really differ from the teacher: a switch is visible
    _, added, _ = show.changed_lines(mod.PLAIN, mod.DISBACK)
    assert added == 15
