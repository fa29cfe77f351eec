"""lightning_min against diffusers' EulerDiscreteScheduler, and the paper's identities."""
import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

import lightning_min as L


def report(name, a, b):
    d = (a.float() - b.float()).abs()
    print(f"{name}: max abs err {d.max().item():.3e}, mean abs err {d.mean().item():.3e}")


def diffusers_scheduler(prediction="epsilon"):
    # SDXL base's scheduler config + the Lightning model card's timestep_spacing="trailing"
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="trailing", prediction_type=prediction)


class Toy:
    """A deterministic nonlinear 'UNet': u = tanh(W x) + sin(t / 300), t the UNet timestep.
    Records the timesteps it sees so both samplers can be compared step by step."""

    def __init__(self, channels=4):
        self.w = torch.randn(channels, channels, generator=torch.Generator().manual_seed(0)) * 0.5
        self.seen = []

    def __call__(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        self.seen.append(t[0].item())
        u = torch.tanh(torch.einsum("oc,bchw->bohw", self.w, x))  # (B, C, H, W)
        return u + torch.sin(t / 300).view(-1, 1, 1, 1)


def noise(shape=(2, 4, 8, 8), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

# -----------------------------------------------------------------------------
# 1. the sampler equals diffusers' Euler loop


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sample_matches_diffusers(steps, prediction):
    x = noise()
    sch = diffusers_scheduler(prediction)
    sch.set_timesteps(steps)
    ref_model = Toy()
    latents = x * sch.init_noise_sigma
    for t in sch.timesteps:
        inp = sch.scale_model_input(latents, t)
        latents = sch.step(ref_model(inp, t), t, latents).prev_sample

    toy = Toy()
    ours = L.sample(lambda x, t, rows=None: toy(x, t - 1), x, steps, prediction)
    report(f"sample steps={steps} {prediction}", ours, latents)
    print("relative:", ((ours - latents).abs().max() / latents.abs().max()).item())
    assert ours.dtype == torch.float32
    assert toy.seen == ref_model.seen == sch.timesteps.tolist()
    if steps == 4:
        assert toy.seen == [999, 749, 499, 249]
    # the eps result is x0 = x_sigma / ... at |x| ~ 15: float32 rounding is ~1e-6 relative
    torch.testing.assert_close(ours, latents, rtol=1e-5, atol=5e-5)


def test_sample_float32_whatever_the_model_dtype():
    toy = Toy()
    x = noise()
    ref = L.sample(lambda x, t, rows=None: toy(x, t - 1), x, 4)
    bf16 = L.sample(lambda x, t: toy(x.bfloat16().float(), t - 1).bfloat16(), x, 4, progress=True)
    assert bf16.dtype == torch.float32
    report("bf16 model vs fp32 model", bf16, ref)
    assert (bf16 - ref).abs().max() < 0.5  # same trajectory, bf16 rounding only (|x| ~ 15)

# -----------------------------------------------------------------------------
# 2. schedule and Eq. (1)-(5)


def test_schedule_equals_diffusers():
    ref = diffusers_scheduler().alphas_cumprod
    assert L.alphas_cumprod().dtype == torch.float32
    assert torch.equal(L.alphas_cumprod(), ref)
    t = torch.tensor([0, 1, 500, 1000])
    assert torch.equal(L.alpha_bar(t), torch.stack([torch.tensor(1.0), ref[0], ref[499], ref[999]]))
    for n in [1, 2, 3, 4, 5, 6, 8, 16, 32, 50, 128]:
        sch = diffusers_scheduler()
        sch.set_timesteps(n)
        assert L.trailing_timesteps(n)[:-1] == [int(v) + 1 for v in sch.timesteps.tolist()], n
        assert L.trailing_timesteps(n)[-1] == 0


def test_alpha_bar_rejects_bad_t():
    with pytest.raises(ValueError, match="0..1000"):
        L.alpha_bar(torch.tensor([1001]))
    with pytest.raises(ValueError, match="0..1000"):
        L.alpha_bar(torch.tensor([-1]))
    with pytest.raises(ValueError, match="integer"):
        L.alpha_bar(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="1..1000"):
        L.trailing_timesteps(0)


def test_flow_identities():
    x0, eps = noise(seed=2), noise(seed=3)
    t = torch.tensor([1, 999])
    xt = L.forward(x0, eps, t)
    a = L.alpha_bar(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    report("to_x0(forward)", L.to_x0(xt, eps, t), x0)
    torch.testing.assert_close(L.to_x0(xt, eps, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(L.to_eps(xt, x0, t), eps, rtol=1e-4, atol=1e-4)
    for pred, u in [("epsilon", eps), ("sample", x0)]:
        report(f"move to 0 ({pred})", L.move(xt, u, t, 0, pred), x0)
        torch.testing.assert_close(L.move(xt, u, t, 0, pred), x0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(L.move(xt, u, t, t, pred), xt, rtol=1e-5, atol=1e-5)
        # a move lands on the same flow: noising x0 with the same eps to t' directly
        torch.testing.assert_close(L.move(xt, u, t, torch.tensor([0, 500]), pred),
                                   L.forward(x0, eps, torch.tensor([0, 500])), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="epsilon"):
        L.move(xt, eps, t, 0, "v_prediction")


class RecordingUNet(torch.nn.Module):
    """A stand-in with the UNet's signature: u = tanh(w x) + t / 1000 + context mean + pooled mean + ids / 1e4.
    Records what it was called with (dtypes included)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=dtype))
        self.calls = []

    def forward(self, x, t, context, pooled, time_ids):
        self.calls.append({"x": x, "t": t, "context": context, "pooled": pooled, "ids": time_ids})
        cond = context.float().mean((1, 2)) + pooled.float().mean(1) + time_ids.float().sum(1) / 1e4  # (B,)
        return (torch.tanh(self.w * x) + (t.float() / 1000 + cond).view(-1, 1, 1, 1)).to(x.dtype)


def conditioning(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1365.0, 2999.0, 0, 0, 1024, 1024]]).expand(B, 6)
    return torch.randn(B, 5, 8, generator=g), torch.randn(B, 6, generator=g), ids


def test_unet_model_time_convention_and_cfg():
    """The one adapter: the UNet gets t - 1 (0 at t = 0); CFG is u_uncond + g (u_cond - u_uncond) in one batched
    call against all-zero inputs or a negative prompt's, the time ids always those of cond."""
    unet, x, cond = RecordingUNet(), noise((3, 4, 2, 2)), conditioning()
    t = torch.tensor([1000, 1, 0])
    u = L.unet_model(unet, cond)(x, t)
    assert unet.calls[-1]["t"].tolist() == [999, 0, 0] and len(unet.calls) == 1
    torch.testing.assert_close(u, unet(x, torch.tensor([999, 0, 0]), *cond))
    zeros = (torch.zeros_like(cond[0]), torch.zeros_like(cond[1]), cond[2])
    neg = conditioning(seed=1)
    for uncond, ref_uncond in ((None, zeros), (neg, (neg[0], neg[1], cond[2]))):
        unet.calls.clear()
        g = L.unet_model(unet, cond, 6.0, uncond)(x, t)
        assert len(unet.calls) == 1 and unet.calls[0]["x"].shape[0] == 6  # one batched call
        assert torch.equal(unet.calls[0]["ids"], torch.cat([cond[2], cond[2]]))
        u_c, u_u = unet(x, t - 1, *cond), unet(x, (t - 1).clamp(min=0), *ref_uncond)
        u_c = unet(x, (t - 1).clamp(min=0), *cond)
        report("CFG vs by hand", g, u_u + 6.0 * (u_c - u_u))
        torch.testing.assert_close(g, u_u + 6.0 * (u_c - u_u))
    unet.calls.clear()
    L.unet_model(unet, cond, 1.0, neg)(x, t)  # guidance <= 1: off, one plain call
    assert unet.calls[0]["x"].shape[0] == 3
    # rows: the model evaluated on some samples only equals those rows of the whole batch
    rows = torch.tensor([0, 2])
    torch.testing.assert_close(L.unet_model(unet, cond, 6.0)(x[rows], t[rows], rows),
                               L.unet_model(unet, cond, 6.0)(x, t)[rows])


def test_unet_model_time_ids_stay_float32_under_bf16_autocast():
    """Issue 7.4: bf16 would round the time id 1365 to 1368 and 2999 to 2992; the UNet gets them in float32,
    x in its parameter dtype, and the output back in float32."""
    assert torch.tensor(1365.0).bfloat16().item() == 1368 and torch.tensor(2999.0).bfloat16().item() == 2992
    unet = RecordingUNet(torch.bfloat16)
    ctx, pooled, ids = conditioning()
    with torch.autocast("cpu", torch.bfloat16):
        u = L.unet_model(unet, (ctx.bfloat16(), pooled.bfloat16(), ids.bfloat16().float()), 2.0)(noise((3, 4, 2, 2)),
                                                                                             torch.tensor([5, 5, 5]))
        L.unet_model(unet, (ctx.bfloat16(), pooled.bfloat16(), ids))(noise((3, 4, 2, 2)), torch.tensor([5, 5, 5]))
    call = unet.calls[-1]
    assert call["x"].dtype == torch.bfloat16 and u.dtype == torch.float32
    assert call["ids"].dtype == torch.float32 and call["ids"][0, :2].tolist() == [1365.0, 2999.0]


def test_teacher_rollout_runs_the_teacher_only_on_moving_samples():
    """Issue 7.5: a sample already at t - ns costs no teacher call; the result equals moving all and keeping
    the finished ones (each sample's path is its own)."""
    toy, seen = Toy(), []

    def teacher(x, t, rows=None):
        seen.append(x.shape[0])
        return toy(x, t - 1)
    x_t, t = noise((4, 4, 4, 4), seed=12), torch.tensor([1000, 750, 500, 250])
    tt = L.target_time(t, 4, 4)  # 2to1 uncond with the skip-level 4-step teacher: 1000 -> 0 in 4 moves
    out = L.teacher_rollout(teacher, x_t, t, tt, 4, s=250.0)
    assert seen == [4, 3, 2, 1]  # was 4 + 4 + 4 + 4: 6 calls at time -1 thrown away
    ref = x_t.clone()
    for i in range(4):  # one sample at a time, the plain way
        ref[i:i + 1] = L.teacher_rollout(lambda x, t, rows=None: toy(x, t - 1), x_t[i:i + 1], t[i:i + 1], tt[i:i + 1],
                                         4, s=250.0)
    report("rollout with skipped samples vs one by one", out, ref)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_teacher_rollout_every_sample_makes_the_same_calls_whatever_the_data():
    """Issue 10.2: every_sample=True (an FSDP-sharded teacher: every rank must make the same calls) runs the teacher
    on the whole batch at every move, whatever the timesteps, and gives the rows result to float tolerance."""
    toy = Toy()
    x_t = noise((4, 4, 4, 4), seed=12)
    for t in (torch.tensor([1000, 750, 500, 250]), torch.tensor([1000, 1000, 1000, 1000])):
        seen = []

        def teacher(x, t, rows=None):
            seen.append(x.shape[0])
            return toy(x, t - 1)
        tt = L.target_time(t, 4, 4)
        out = L.teacher_rollout(teacher, x_t, t, tt, 4, s=250.0, every_sample=True)
        assert seen == [4, 4, 4, 4]
        ref = L.teacher_rollout(lambda x, t, rows=None: toy(x, t - 1), x_t, t, tt, 4, s=250.0)
        report(f"every_sample vs rows, t = {t.tolist()}", out, ref)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# -----------------------------------------------------------------------------
# 3. the teacher rollout (Eq. 7-13) and the student jump (Eq. 14-15)


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_teacher_rollout_is_n_moves(prediction):
    toy = Toy()
    teacher = lambda x, t, rows=None: toy(x, t - 1)  # noqa: E731
    x_t = noise(seed=4)
    t, tt = torch.tensor([1000, 600]), torch.tensor([500, 0])
    out = L.teacher_rollout(teacher, x_t, t, tt, 2, prediction)
    # by hand: 1000 -> 750 -> 500 and 600 -> 300 -> 0
    x = x_t.clone()
    for a, b in [([1000, 600], [750, 300]), ([750, 300], [500, 0])]:
        a, b = torch.tensor(a), torch.tensor(b)
        x = L.move(x, teacher(x, a), a, b, prediction)
    report(f"rollout vs hand moves ({prediction})", out, x)
    torch.testing.assert_close(out, x, rtol=0, atol=0)


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
@pytest.mark.parametrize("n", [1, 3, 4])
def test_teacher_rollout_from_T_equals_sample(n, prediction):
    toy = Toy()
    teacher = lambda x, t, rows=None: toy(x, t - 1)  # noqa: E731
    z = noise(seed=5)
    x_T = z * math.sqrt(1 - L.alpha_bar(torch.tensor([1000])).item())  # where `sample` starts
    B = z.shape[0]
    t, tt = torch.full((B,), 1000), torch.zeros(B, dtype=torch.long)
    out = L.teacher_rollout(teacher, x_T, t, tt, n, prediction)
    seen, toy.seen = toy.seen, []
    ref = L.sample(teacher, z, n, prediction)
    report(f"rollout T->0 vs sample n={n} {prediction}", out, ref)
    assert seen == toy.seen
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_teacher_rollout_on_the_teacher_grid():
    # 128to32: a student step of 31.25 is 4 teacher steps of 7.8125; the teacher must visit its
    # own trailing grid, not an even split of the rounded interval
    toy = Toy()
    grid = L.trailing_timesteps(128)
    t = torch.tensor([grid[4]])
    tt = L.target_time(t, 4, 128)
    assert tt.item() == grid[8]
    L.teacher_rollout(lambda x, t, rows=None: toy(x, t - 1), noise((1, 4, 4, 4)), t, tt, 4, s=1000 / 128)
    assert [v + 1 for v in toy.seen] == grid[4:8]


def test_teacher_rollout_clamps_at_zero():
    # 4to2 at t = 250 with the 4-step teacher (s = 250, n = 2): 250 -> 0, then nothing
    toy = Toy()
    teacher = lambda x, t, rows=None: toy(x, t - 1)  # noqa: E731
    x_t, t = noise(seed=6), torch.tensor([500, 250])
    tt = L.target_time(t, 2, 4)
    assert tt.tolist() == [0, 0]
    out = L.teacher_rollout(teacher, x_t, t, tt, 2, s=250.0)
    x1 = L.move(x_t, teacher(x_t, t), t, torch.tensor([250, 0]))
    x2 = L.move(x1, teacher(x1, torch.tensor([250, 250])), torch.tensor([250, 250]), 0)
    ref = torch.cat([x2[:1], x1[1:]])  # the second sample already stands at 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_target_time():
    for stage in L.STAGES.values():
        teacher = L.trailing_timesteps(stage.teacher_steps)
        student = L.trailing_timesteps(stage.student_steps)
        got = L.target_time(torch.tensor(student[:-1]), stage.n, stage.teacher_steps)
        assert got.tolist() == student[1:], stage.name
        assert set(student) <= set(teacher)
    # off-grid or past 0: t - n s clamped
    assert L.target_time(torch.tensor([750, 250, 300]), 2, 2).tolist() == [0, 0, 0]
    assert L.target_time(torch.tensor([750]), 1, 2).tolist() == [250]


def test_student_jump_has_grad():
    w = torch.nn.Parameter(torch.tensor(0.3))
    student = lambda x, t, rows=None: torch.tanh(w * x)  # noqa: E731
    x_t, t, tt = noise(seed=7), torch.tensor([1000, 500]), torch.tensor([500, 0])
    out = L.student_jump(student, x_t, t, tt, "sample")
    torch.testing.assert_close(out, L.move(x_t, torch.tanh(0.3 * x_t), t, tt, "sample"))
    out.square().mean().backward()
    assert w.grad is not None and w.grad != 0
    assert not L.teacher_rollout(student, x_t, t, tt, 2).requires_grad

# -----------------------------------------------------------------------------
# 4-7. Eq. (24), Sec. 3.7.2, the losses


def test_forward_fixed():
    x0, eps = noise(seed=8), noise(seed=9)
    t = torch.tensor([1000, 999])
    out = L.forward_fixed(x0, eps, t)
    assert torch.equal(out[0], eps[0])
    assert torch.equal(out[1], L.forward(x0, eps, t)[1])
    assert not torch.allclose(L.forward(x0, eps, t)[0], eps[0])  # the flawed schedule at T


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (5, 1, 1, 1)])
def test_renoise_timesteps(weights):
    g = torch.Generator().manual_seed(0)
    t = L.renoise_timesteps(g, 20000, weights)
    assert t.shape == (20000,) and t.dtype == torch.long
    for v, w in zip([10, 250, 500, 750], weights):
        freq = (t == v).float().mean().item()
        print(f"t*={v}: {freq:.4f} (expected {w / sum(weights):.4f})")
        assert abs(freq - w / sum(weights)) < 0.02
    with pytest.raises(ValueError):
        L.renoise_timesteps(g, 4, (1, 1, 1))


def test_adversarial_losses():
    real, fake = torch.randn(16), torch.randn(16)
    p, p_hat = torch.sigmoid(real), torch.sigmoid(fake)
    torch.testing.assert_close(L.loss_d(real, fake), (-torch.log(p) - torch.log(1 - p_hat)).mean())
    torch.testing.assert_close(L.loss_g(fake), (-torch.log(p_hat)).mean())
    torch.testing.assert_close(L.loss_d(torch.zeros(4), torch.zeros(4)), torch.tensor(math.log(4)))
    # softplus stays finite where -log(sigmoid) underflows
    assert torch.isfinite(L.loss_d(torch.tensor([-200.0]), torch.tensor([200.0])))
    torch.testing.assert_close(L.loss_mse(real, fake), ((real - fake) ** 2).mean())


def test_loss_convert():
    x_t, eps = noise(seed=10), noise(seed=11)
    t = torch.tensor([1000, 250])
    assert L.loss_convert(L.to_x0(x_t, eps, t), x_t, eps, t).item() == 0
    assert L.loss_convert(L.to_x0(x_t, eps, t) + 0.1, x_t, eps, t).item() == pytest.approx(0.01, rel=1e-4)

# -----------------------------------------------------------------------------
# 8. the stage table


def test_stages():
    assert list(L.STAGES) == ["128to32", "32to8", "8to4", "4to2", "2to1"]
    assert L.STAGES["128to32"].phases == ("mse",)
    for name in ["32to8", "8to4", "4to2"]:
        assert L.STAGES[name].phases == ("cond", "uncond", "full")
    assert L.STAGES["2to1"].phases == ("convert", "cond", "uncond")
    for s in L.STAGES.values():
        assert s.teacher_steps == s.n * s.student_steps
        for ph in s.phases:
            spec = L.phase_spec(s.name, ph)
            # a skip-level teacher still covers exactly one student step
            assert spec.n * 1000 / spec.teacher_steps == 1000 / s.student_steps
            assert spec.cfg == (6.0 if s.name == "128to32" else 1.0)
    assert L.phase_spec("4to2", "uncond").teacher_steps == 8 and L.phase_spec("4to2", "uncond").n == 4
    assert L.phase_spec("4to2", "cond").teacher_steps == 4 and L.phase_spec("4to2", "cond").n == 2
    assert L.phase_spec("2to1", "uncond").teacher_steps == 4
    assert L.phase_spec("2to1", "cond").teacher_steps == 2
    cond, full = L.phase_spec("8to4", "cond"), L.phase_spec("8to4", "full")
    assert (cond.lora, cond.discriminator, cond.lr, cond.betas) == (True, "conditional", 1e-6, (0.0, 0.99))
    assert (full.lora, full.discriminator, full.lr) == (False, "unconditional", 5e-7)
    mse = L.phase_spec("128to32", "mse")
    assert (mse.loss, mse.discriminator, mse.lr, mse.betas) == ("mse", None, 1e-5, (0.9, 0.999))
    for ph in ["convert", "cond", "uncond"]:
        spec = L.phase_spec("2to1", ph)
        assert spec.student_prediction == "sample" and spec.teacher_prediction == "epsilon" and not spec.lora
    assert L.phase_spec("8to4", "cond").student_prediction == "epsilon"
    # Sec. 3.7.2 is a one- and two-step technique: re-noising on by default in 4to2 and 2to1 only
    for s in L.STAGES.values():
        for ph in s.phases:
            spec = L.phase_spec(s.name, ph)
            assert spec.renoise == (s.name in ("4to2", "2to1") and spec.discriminator is not None), (s.name, ph)
    assert len(L.PHASE_TABLE) == sum(len(s.phases) for s in L.STAGES.values()) + 4  # + the MSE ablations


def test_ablation_phases():
    """Sec. 3.2's baseline, MSE-only progressive distillation, is a phase of every later stage that a stage never
    runs by default; Sec. 3.7.3's 1-step student without the x0 switch is a prediction override."""
    for name in ["32to8", "8to4", "4to2", "2to1"]:
        st = L.STAGES[name]
        assert "mse" in L.stage_phases(name, ablations=True) and "mse" not in L.stage_phases(name)
        spec = L.phase_spec(name, "mse")
        assert (spec.loss, spec.discriminator, spec.lora, spec.teacher_steps, spec.n, spec.cfg) == \
            ("mse", None, False, st.teacher_steps, st.n, 1.0)
    assert L.phase_spec("2to1", "mse").student_prediction == "sample"
    assert L.phase_spec("2to1", "cond", "epsilon").student_prediction == "epsilon"
    assert L.phase_spec("2to1", "cond").student_prediction == "sample"
    with pytest.raises(ValueError, match="prediction 'v'"):
        L.phase_spec("2to1", "cond", "v")


def test_phase_spec_errors():
    with pytest.raises(ValueError, match="'cond', 'uncond', 'full'"):
        L.phase_spec("8to4", "convert")
    with pytest.raises(ValueError, match="128to32"):
        L.phase_spec("16to4", "cond")


def test_student_timesteps():
    assert set(L.student_timesteps(1)) == set(L.student_timesteps(2)) == {250, 500, 750, 1000}
    assert L.student_timesteps(4) == [1000, 750, 500, 250]
    assert L.phase_spec("4to2", "cond").timesteps == (1000, 750, 500, 250)
    assert L.student_timesteps(8) == L.trailing_timesteps(8)[:-1]
