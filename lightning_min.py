"""
SDXL-Lightning (arXiv 2402.13929), the method itself: no I/O, no model code.

Time is the paper's integer t in 0..T, T = 1000, with alpha_bar(0) = 1 (clean data). Every `model`
here is a callable model(x_t, t, rows=None) -> u with t a (B,) long tensor of paper time and u an
epsilon or an x0 ("sample") prediction; `rows`, when given, says which samples of the batch the model
was built for x holds (a rollout calls the teacher only on samples that still move). `unet_model`
makes such a model of a UNet: the one place where the UNet gets t - 1 and where CFG happens. Read top
to bottom: schedule, Eq. (1)-(5), the UNet adapter, sampling, distillation, the update on one batch
(its draws, the teacher's target, the discriminator's inputs, the losses), the stage and phase tables
with the hand-offs between phases.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

T = 1000
PREDICTIONS = ("epsilon", "sample")  # diffusers' names for eps- and x0-prediction
RENOISE_T = (10, 250, 500, 750)  # Sec. 3.7.2: t* for the discriminator's input

# -----------------------------------------------------------------------------
# schedule

_ALPHAS = []  # the float32 schedule, computed once
_ABAR = {}  # device -> (1001,) alpha_bar with alpha_bar(0) = 1 in front


def alphas_cumprod():
    """SDXL's scaled-linear schedule, in float32 exactly as diffusers computes it. (1000,)"""
    if not _ALPHAS:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float32) ** 2
        _ALPHAS.append(torch.cumprod(1.0 - betas, dim=0))
    return _ALPHAS[0]


def alpha_bar(t):
    """alpha_bar(t) = alphas_cumprod[t - 1] for t >= 1 and 1 at t = 0. (B,) long -> (B,) float32"""
    t = torch.as_tensor(t)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"lightning_min: t must be an integer tensor, got {t.dtype}")
    if t.numel() and (t.min() < 0 or t.max() > T):
        raise ValueError(f"lightning_min: t must lie in 0..{T}, got {t.min().item()}..{t.max().item()}")
    if t.device not in _ABAR:
        _ABAR[t.device] = torch.cat([torch.ones(1), alphas_cumprod()]).to(t.device)
    return _ABAR[t.device][t]


def _ab(t, x):
    """alpha_bar(t) shaped to broadcast over x: an int or (B,) -> (B, 1, 1, 1), float32."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return alpha_bar(t).view(-1, *[1] * (x.ndim - 1))


def _check(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"lightning_min: prediction must be one of {PREDICTIONS}, got {prediction!r}")

# -----------------------------------------------------------------------------
# Eq. (1)-(5): the flow. All math in float32 whatever the inputs' dtype (promotion does it).


def forward(x0, eps, t):
    """Eq. (1): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    a = _ab(t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def forward_fixed(x0, eps, t):
    """Eq. (24): pure noise at t = T (SDXL's schedule never reaches it), Eq. (1) elsewhere."""
    t = torch.as_tensor(t, device=x0.device).expand(x0.shape[0])
    at_T = (t == T).view(-1, *[1] * (x0.ndim - 1))
    return torch.where(at_T, eps.float(), forward(x0, eps, t))


def to_x0(xt, eps, t):
    """Eq. (3): x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    a = _ab(t, xt)
    return (xt - (1 - a).sqrt() * eps) / a.sqrt()


def to_eps(xt, x0, t):
    """Eq. (4): eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t). Undefined at t = 0."""
    a = _ab(t, xt)
    return (xt - a.sqrt() * x0) / (1 - a).sqrt()


def move(xt, u, t, t_next, prediction="epsilon"):
    """Eq. (5): move(x_t, u, t, t') = forward(x(x_t, u, t), eps(x_t, u, t), t'), a DDIM step.
    With trailing timesteps it is the same map as diffusers' Euler step in sigma space."""
    _check(prediction)
    if prediction == "epsilon":
        x0, eps = to_x0(xt, u, t), u
    else:  # an x0 model at t = 0 has no defined eps; nobody moves from clean data
        x0, eps = u, to_eps(xt, u, t)
    return forward(x0, eps, t_next)

# -----------------------------------------------------------------------------
# the UNet as a model(x, t): the time convention and classifier-free guidance, in one place


def unet_model(unet, cond, guidance=1.0, uncond=None):
    """model(x, t) -> u (float32) at paper time t; cond = (context, pooled, time_ids); guidance > 1: CFG
    u_uncond + g (u_cond - u_uncond) in one batched call, uncond = (context, pooled, time_ids) of a negative
    prompt or None for SDXL's all-zero input (time ids stay those of cond).

    The UNet is called with t - 1, its embedding index; at t = 0 (clean data, the discriminator's input
    when nothing re-noises it) with 0, the nearest time it was trained on. x is cast to the UNet's
    parameter dtype; the 6 time ids stay float32 (bf16 would round 1365 to 1368). `unet` is anything
    with the UNet's call signature and .parameters() (the discriminator passes its encoder).
    guidance <= 1 is off, as in diffusers, so the Lightning models cost one evaluation."""
    dtype = next(unet.parameters()).dtype
    context, pooled, ids = cond
    ids = ids.float()
    if guidance > 1:
        u_context, u_pooled = (torch.zeros_like(context), torch.zeros_like(pooled)) if uncond is None else \
            (uncond[0].expand_as(context), uncond[1].expand_as(pooled))

    def model(x, t, rows=None):
        c, p, i = (context, pooled, ids) if rows is None else (context[rows], pooled[rows], ids[rows])
        t_unet = (torch.as_tensor(t, device=x.device).reshape(-1) - 1).clamp(min=0).expand(x.shape[0])  # (B,)
        if guidance <= 1:
            return unet(x.to(dtype), t_unet, c, p, i).float()
        uc, up = (u_context, u_pooled) if rows is None else (u_context[rows], u_pooled[rows])
        u_uncond, u_cond = unet(torch.cat([x, x]).to(dtype), torch.cat([t_unet, t_unet]), torch.cat([uc, c]),
                                torch.cat([up, p]), torch.cat([i, i])).float().chunk(2)
        return u_uncond + guidance * (u_cond - u_uncond)
    return model

# -----------------------------------------------------------------------------
# sampling


def trailing_timesteps(n):
    """diffusers' timestep_spacing="trailing" in paper time: [1000, ..., 1000/n, 0] (n + 1 values)."""
    if not 1 <= n <= T:
        raise ValueError(f"lightning_min: steps must be in 1..{T}, got {n}")
    return [round(T - k * T / n) for k in range(n)] + [0]


def trained_strengths(steps):
    """The img2img strengths a `steps`-step model was trained for: its training times / T (Sec. 3.7.1:
    0.25, 0.5, 0.75, 1 for the 1- and 2-step models; k / N on the trailing grid for N steps)."""
    return sorted(t / T for t in student_timesteps(steps))


def timesteps(steps, strength=1.0):
    """The times a `steps`-step model visits from t_0 = round(strength * T) to 0. On its trailing grid (strength
    1, or k / N for N steps) they are the rest of that grid; elsewhere (the 1- and 2-step models' other training
    times, Sec. 3.7.1) each move is one of its steps, t -> t - T/steps clamped at 0 (target_time, Eq. 13-15):
    a 2-step model at 0.75 visits 750, 250, 0."""
    t = round(strength * T)
    if not 1 <= t <= T:
        raise ValueError(f"lightning_min: strength must be in (0, 1], got {strength}")
    grid = trailing_timesteps(steps)
    if t in grid:
        return grid[grid.index(t):]
    ts = [t]
    while ts[-1] > 0:
        ts.append(int(target_time(torch.tensor(ts[-1]), 1, steps)))
    return ts


@torch.no_grad()
def sample(model, noise, steps, prediction="epsilon", progress=False, *, x0=None, strength=1.0, callback=None):
    """Eq. (5) repeated along timesteps(steps, strength) down to t = 0; noise ~ N(0, I). -> x_0, float32

    Text-to-image (x0 None, strength 1): diffusers starts from init_noise_sigma * noise and scales it by
    1/sqrt(sigma^2 + 1), so the model first sees sqrt(1 - alpha_bar_T) * noise, not the pure noise of
    Eq. (24); we match it. img2img (SDEdit, x0 a clean latent): the start is Eq. (1), x_t0 = forward(x0,
    noise, t_0). callback(step), if given, sees every model output before the move, step = dict(i=, n=, t=,
    t_next=, x=, u=) (k-diffusion's style); raising there stops the loop (sample.py's NaN check)."""
    ts = timesteps(steps, strength)
    if x0 is None:
        if ts[0] != T:
            raise ValueError(f"lightning_min: strength {strength} < 1 needs x0 (the image to start from)")
        x = noise.float() * (1 - alpha_bar(torch.tensor([T]))).sqrt().item()
    else:
        x = forward(x0, noise, ts[0])
    pairs = list(zip(ts[:-1], ts[1:]))
    for i, (t, t_next) in enumerate(tqdm(pairs, disable=not progress)):
        t_b = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        u = model(x, t_b).float()
        if callback is not None:
            callback(dict(i=i, n=len(pairs), t=t, t_next=t_next, x=x, u=u))
        x = move(x, u, t_b, t_next, prediction)
    return x

# -----------------------------------------------------------------------------
# distillation: progressive (Eq. 6-16), adversarial (Eq. 17-21), the x0 switch (Eq. 27-29)


def _unround(t, s):
    """The unrounded trailing-grid time behind t: 1000 - j s when t = round(1000 - j s), else t.
    Keeps a rollout on the teacher's own grid, e.g. 969 -> 968.75 on the 128-step grid."""
    t = t.double()
    j = torch.round((T - t) / s)
    on_grid = torch.round(T - j * s) == t
    return torch.where(on_grid, T - j * s, t)


def target_time(t, n, teacher_steps):
    """t - n s clamped at 0, s = 1000 / teacher_steps: the paper's t - ns for Eq. (13)-(15).
    Exactly: u = 1000 - j s if t = round(1000 - j s) for an integer j (t on the teacher's trailing
    grid), else u = t; then max(round(u - n s), 0) with round-half-to-even, as diffusers rounds.
    On the grid the target is the grid point n teacher steps later, e.g. 32to8: 1000 -> 875."""
    s = T / teacher_steps
    t = torch.as_tensor(t)
    return torch.round(_unround(t, s) - n * s).clamp(min=0).long()


@torch.no_grad()
def teacher_rollout(teacher, x_t, t, t_target, n, prediction="epsilon", s=None, every_sample=False):
    """Eq. (7)-(13): n teacher moves from t to t_target, per sample (t may differ per sample).
    s is the teacher's step (1000 / teacher_steps): given, the moves land on the teacher's
    trailing grid, round(u - k s) as in target_time, and a move that would pass t_target stops
    there (the paper's "t - ns clamped"), the remaining moves being skipped. None spreads the n
    moves evenly over [t_target, t]; both agree when t_target = t - n s on the grid. Intermediate
    times are rounded to integers; the last move always lands on t_target. The teacher runs only
    on the samples that still move (called with their `rows`); the others stay put for free. every_sample:
    it runs on the whole batch at every move and the finished samples keep their value, so the number of
    calls does not depend on the data (an FSDP-sharded teacher needs every rank to make the same calls)."""
    t, t_target = t.long(), t_target.long().to(t.device)
    if s is None:
        start, s = t.double(), (t - t_target).double() / n
    else:
        start = _unround(t, s)
    x, cur = x_t.float(), t
    for k in range(1, n + 1):
        nxt = t_target if k == n else torch.maximum(torch.round(start - k * s).long(), t_target)
        active = nxt < cur  # samples already at t_target stay put
        if every_sample:
            moved = move(x, teacher(x, cur).float(), cur, nxt, prediction)
            x = torch.where(active[:, None, None, None], moved, x)
        elif active.all():
            x = move(x, teacher(x, cur).float(), cur, nxt, prediction)
        elif active.any():
            rows = active.nonzero().squeeze(1)
            x = x.index_copy(0, rows, move(x[rows], teacher(x[rows], cur[rows], rows).float(), cur[rows],
                                           nxt[rows], prediction))
        cur = nxt
    return x


def student_jump(student, x_t, t, t_target, prediction):
    """Eq. (14)-(15): one student move from t straight to t - ns, with gradients."""
    return move(x_t, student(x_t, t).float(), t, t_target, prediction)


def loss_mse(x_hat, x_target):
    """Eq. (16): ||x_hat_{t-ns} - x_{t-ns}||^2, mean over elements."""
    return F.mse_loss(x_hat.float(), x_target.float())


def loss_d(logit_real, logit_fake):
    """Eq. (20): -log p - log(1 - p_hat) with p = sigmoid(logit), as softplus for stability."""
    return F.softplus(-logit_real.float()).mean() + F.softplus(logit_fake.float()).mean()


def loss_g(logit_fake):
    """Eq. (21): non-saturating -log p_hat = softplus(-logit_fake)."""
    return F.softplus(-logit_fake.float()).mean()


def loss_convert(x0_online, x_t, eps_frozen, t):
    """Eq. (27)-(29): ||x0_online - x(x_t, eps_frozen, t)||^2, the frozen eps model as x0 target."""
    return F.mse_loss(x0_online.float(), to_x0(x_t, eps_frozen.float(), t))


def renoise_timesteps(generator, batch, weights=(1, 1, 1, 1)):
    """Sec. 3.7.2: t* drawn from {10, 250, 500, 750} with weights 1:1:1:1, later 5:1:1:1, for
    Eq. (25)-(26). (B,) long, on the generator's device."""
    if len(weights) != len(RENOISE_T) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"lightning_min: weights must be 4 non-negative numbers, got {weights}")
    w = torch.tensor(weights, dtype=torch.float, device=generator.device)
    idx = torch.multinomial(w, batch, replacement=True, generator=generator)
    return torch.tensor(RENOISE_T, device=generator.device)[idx]


def student_timesteps(student_steps):
    """Sec. 3.7.1: the student trains at its own trailing timesteps (0 excluded); the 2- and 1-step
    students at {250, 500, 750, 1000} for stability (and SDEdit at those t)."""
    if student_steps <= 2:
        return [1000, 750, 500, 250]
    return trailing_timesteps(student_steps)[:-1]

# -----------------------------------------------------------------------------
# the update on one batch (Sec. 3.2-3.7): the draws, the teacher's target, the two losses


@dataclass
class Batch:
    """One micro-batch, its per-sample draws, and (after teacher_target) the teacher's target."""
    x0: torch.Tensor  # (B, 4, h, w) clean latents
    cond: tuple  # (context (B, 77, 2048), pooled (B, 1280), time ids (B, 6) float32)
    eps: torch.Tensor  # (B, 4, h, w) the noise of x_t
    eps2: torch.Tensor  # (B, 4, h, w) a fresh noise for re-noising (Sec. 3.7.2)
    t: torch.Tensor  # (B,) the student's timesteps
    t_star: torch.Tensor  # (B,) re-noise timesteps in {10, 250, 500, 750}
    renoise: bool  # whether the discriminator's clean inputs are noised again
    x_t: torch.Tensor = None  # (B, 4, h, w)
    t_tgt: torch.Tensor = None  # (B,) t - ns, clamped at 0
    target: torch.Tensor = None  # (B, 4, h, w) the teacher's x_{t-ns} (convert: its eps)


def draw(generators, shape, timesteps, renoise_weights=(1, 1, 1, 1)):
    """The per-sample draws of a micro-batch, one generator per sample, in this order from each: eps and eps2
    ~ N(0, I) of `shape`, t uniform over the student's `timesteps` (Sec. 3.7.1), t* from RENOISE_T at
    `renoise_weights` (Sec. 3.7.2). A generator seeded from the sample alone makes the draws independent of
    the ranks, the micro-batch size and resumes.
    -> eps, eps2 (B, *shape) float32, t, t_star (B,) long, on the CPU."""
    eps, eps2, t, t_star = [], [], [], []
    for gen in generators:
        eps.append(torch.randn(shape, generator=gen))
        eps2.append(torch.randn(shape, generator=gen))
        t.append(timesteps[torch.randint(len(timesteps), (1,), generator=gen).item()])
        t_star.append(renoise_timesteps(gen, 1, renoise_weights)[0].item())
    return torch.stack(eps), torch.stack(eps2), torch.tensor(t), torch.tensor(t_star)


def make_batch(x0, cond, generators, timesteps, renoise_weights, renoise):
    """A Batch of latents x0 (B, 4, h, w) and their conditioning, with draw()'s draws on x0's device."""
    eps, eps2, t, t_star = draw(generators, x0.shape[1:], timesteps, renoise_weights)
    dev = x0.device
    return Batch(x0=x0, cond=cond, eps=eps.to(dev), eps2=eps2.to(dev), t=t.to(dev), t_star=t_star.to(dev),
                 renoise=renoise)


@torch.no_grad()
def teacher_target(teacher, b, spec, every_sample=False):
    """x_t (Eq. 1; pure noise at t = T, Eq. 24), then the teacher's x_{t-ns}: n moves of Eq. (7)-(13), t - ns
    clamped at 0. In the convert phase the frozen eps-model's prediction at x_t instead (Eq. 27).
    teacher: a model(x, t, rows) of the teacher (unet_model); every_sample: see teacher_rollout."""
    b.x_t = forward_fixed(b.x0, b.eps, b.t)
    b.t_tgt = target_time(b.t, spec.n, spec.teacher_steps)
    if spec.loss == "convert":
        b.target = teacher(b.x_t, b.t)
    else:
        b.target = teacher_rollout(teacher, b.x_t, b.t, b.t_tgt, spec.n, spec.teacher_prediction,
                                   s=T / spec.teacher_steps, every_sample=every_sample)
    return b


def disc_logits(disc, x, b):
    """D on a sample at t - ns: Eq. (22) also sees x_t, Eq. (23) does not. Where re-noising is on (Sec. 3.7.2,
    Eq. 25-26), a clean sample (t - ns = 0) is first noised again to t* with a fresh noise."""
    t_d = b.t_tgt
    if b.renoise:
        clean = b.t_tgt == 0
        t_d = torch.where(clean, b.t_star, b.t_tgt)
        x = torch.where(clean[:, None, None, None], forward(x, b.eps2, b.t_star).to(x.dtype), x)
    return disc(x, t_d, b.cond, b.x_t, b.t)


def discriminator_loss(disc, student, b, spec):
    """Eq. (20): -log D(teacher's x_{t-ns}) - log(1 - D(student's x_{t-ns})). The student only samples here.
    -> the loss and the logits on real and fake."""
    with torch.no_grad():
        x_hat = student_jump(unet_model(student, b.cond), b.x_t, b.t, b.t_tgt, spec.student_prediction)
    real, fake = disc_logits(disc, b.target, b), disc_logits(disc, x_hat, b)
    return loss_d(real, fake), real, fake


def student_loss(student, disc, b, spec):
    """The student's one jump from x_t to t - ns (Eq. 14-15) against the teacher's n moves: the non-saturating
    -log D(x_hat) (Eq. 21), or the MSE (Eq. 16); convert: its x0 against the eps-model's (Eq. 29)."""
    model = unet_model(student, b.cond)
    if spec.loss == "convert":
        return loss_convert(model(b.x_t, b.t), b.x_t, b.target, b.t)
    x_hat = student_jump(model, b.x_t, b.t, b.t_tgt, spec.student_prediction)
    if spec.loss == "mse":
        return loss_mse(x_hat, b.target)
    return loss_g(disc_logits(disc, x_hat, b))

# -----------------------------------------------------------------------------
# the stage table (Sec. 3.6, 3.7)


@dataclass(frozen=True)
class Stage:
    name: str
    teacher_steps: int  # the teacher's steps; 128 = SDXL base sampled on a 128-step grid
    student_steps: int  # the steps the student is trained to sample with
    n: int  # teacher steps per student step (teacher_steps / student_steps)
    phases: tuple  # in training order
    cfg: float = 1.0  # teacher guidance scale, zero uncond; 6.0 only in 128to32, <= 1 is off

    def __post_init__(self):
        if self.teacher_steps != self.n * self.student_steps:
            raise ValueError(f"lightning_min: stage {self.name}: n * student_steps != teacher_steps")


STAGES = {s.name: s for s in [
    Stage("128to32", 128, 32, 4, ("mse",), cfg=6.0),
    Stage("32to8", 32, 8, 4, ("cond", "uncond", "full")),
    Stage("8to4", 8, 4, 2, ("cond", "uncond", "full")),
    Stage("4to2", 4, 2, 2, ("cond", "uncond", "full")),
    Stage("2to1", 2, 1, 2, ("convert", "cond", "uncond")),
]}


@dataclass(frozen=True)
class PhaseSpec:
    stage: str
    phase: str
    loss: str  # "mse" Eq. (16), "adversarial" Eq. (20)-(21), "convert" Eq. (29)
    lora: bool  # train a LoRA (teacher = student with LoRA off) or the whole UNet
    discriminator: str | None  # "conditional" Eq. (22), "unconditional" Eq. (23), None
    teacher_steps: int  # the teacher of this phase (skip-level where it applies, Sec. 3.4)
    lr: float  # Adam, student and discriminator alike
    betas: tuple
    renoise: bool  # Sec. 3.7.2: noise a clean target again to t* before the discriminator
    n: int  # teacher steps per student step
    cfg: float  # teacher guidance scale
    student_prediction: str  # "epsilon", or "sample" (x0) for the 1-step model (Sec. 3.7.3)
    teacher_prediction: str  # always "epsilon": only the 1-step student switches
    timesteps: tuple  # the student's training timesteps (Sec. 3.7.1)
    after: str | None  # the phase whose fp32 checkpoint this one starts from; None: the stage's init
    carry_lora: str | None  # that phase's LoRA: "continue" training it, "merge" it into the base (fp32)
    carry_disc: str | None  # that phase's D: its "backbone" (a new head, new Adam), or "whole" with Adam
    weight_decay: float = 0.0

    @property
    def carry_disc_adam(self):
        return self.carry_disc == "whole"


# One row per (stage, phase), the paper's values. LoRA in the two adversarial objectives (Sec. 3.6) but not
# for the 1-step model (Sec. 3.7.3); the paper names no LoRA for the MSE stage. Adam lr 1e-6 with LoRA, 5e-7
# without, betas (0, 0.99) (Sec. 3.6); the MSE stage's 1e-5, (0.9, 0.999) also for convert (our choice).
# The skip-level teacher (Sec. 3.4) covers one student step in more, smaller steps: 4to2 uncond uses the
# 8-step model, n = 4. Re-noising is a one- and two-step technique (Sec. 3.7 opens "For one-step and
# two-step distillations"), so on in 4to2 and 2to1 only; train.py --renoise turns it on elsewhere.
# The hand-offs (Sec. 3.6), the last three columns: the phase a phase starts from (`after`: its fp32
# checkpoint, never the fp16 release file; None: the stage's init, the previous stage's model), what it does
# with that phase's LoRA (CONT: uncond trains cond's LoRA on; MERGE: full merges it into the same base in
# fp32) and with its discriminator, re-initialized per stage, not per phase (BACK: uncond keeps cond's
# backbone and the x_{t-ns} half of its head, discriminator.unconditional_from, Adam anew; WHOLE: full
# keeps uncond's discriminator and its Adam state). T: the phase's teacher steps.
MSE, ADV, CONV = "mse", "adversarial", "convert"
C, U = "conditional", "unconditional"
B_MSE, B_ADV = (0.9, 0.999), (0.0, 0.99)  # Adam's betas
CONT, MERGE, BACK, WHOLE = "continue", "merge", "backbone", "whole"
PHASE_TABLE = [
    # stage     phase      loss  LoRA   D     T    lr    betas  renoise after    LoRA   D      # Sec.
    ("128to32", "mse",     MSE,  False, None, 128, 1e-5, B_MSE, False, None,      None,  None),  # Eq. 16
    ("32to8",   "cond",    ADV,  True,  C,    32,  1e-6, B_ADV, False, None,      None,  None),  # Eq. 22
    ("32to8",   "uncond",  ADV,  True,  U,    32,  1e-6, B_ADV, False, "cond",    CONT,  BACK),  # Eq. 23
    ("32to8",   "full",    ADV,  False, U,    32,  5e-7, B_ADV, False, "uncond",  MERGE, WHOLE),  # 3.6
    ("8to4",    "cond",    ADV,  True,  C,    8,   1e-6, B_ADV, False, None,      None,  None),  # 3.6
    ("8to4",    "uncond",  ADV,  True,  U,    8,   1e-6, B_ADV, False, "cond",    CONT,  BACK),  # 3.6
    ("8to4",    "full",    ADV,  False, U,    8,   5e-7, B_ADV, False, "uncond",  MERGE, WHOLE),  # 3.6
    ("4to2",    "cond",    ADV,  True,  C,    4,   1e-6, B_ADV, True,  None,      None,  None),  # 3.7.1-2
    ("4to2",    "uncond",  ADV,  True,  U,    8,   1e-6, B_ADV, True,  "cond",    CONT,  BACK),  # 3.4
    ("4to2",    "full",    ADV,  False, U,    8,   5e-7, B_ADV, True,  "uncond",  MERGE, WHOLE),  # 3.4
    ("2to1",    "convert", CONV, False, None, 2,   1e-5, B_MSE, False, None,      None,  None),  # Eq. 29
    ("2to1",    "cond",    ADV,  False, C,    2,   5e-7, B_ADV, True,  "convert", None,  None),  # 3.7.1-3
    ("2to1",    "uncond",  ADV,  False, U,    4,   5e-7, B_ADV, True,  "cond",    None,  BACK),  # 3.4
    # Ablations, run only when named (train.py --phase mse): MSE-only progressive distillation (Sec. 3.1-3.2),
    # the baseline the adversarial objective replaces. 2to1's starts from its convert phase (an x0 student).
    ("32to8",   "mse",     MSE,  False, None, 32,  1e-5, B_MSE, False, None,      None,  None),  # 3.2
    ("8to4",    "mse",     MSE,  False, None, 8,   1e-5, B_MSE, False, None,      None,  None),  # 3.2
    ("4to2",    "mse",     MSE,  False, None, 4,   1e-5, B_MSE, False, None,      None,  None),  # 3.2
    ("2to1",    "mse",     MSE,  False, None, 2,   1e-5, B_MSE, False, "convert", None,  None),  # 3.2
]


def stage_phases(stage, ablations=False):
    """The stage's phases: in training order (what a stage runs), or every phase it has, with ablations."""
    return tuple(r[1] for r in PHASE_TABLE if r[0] == stage) if ablations else STAGES[stage].phases


def skipped(phase, prediction=None):
    """The x0 switch is skipped when the 1-step student keeps predicting epsilon (the Sec. 3.7.3 ablation)."""
    return phase == "convert" and prediction == "epsilon"


def run_order(stage, prediction=None):
    """The phases a stage runs without train.py --phase: its training order, less skipped phases."""
    return tuple(p for p in stage_phases(stage) if not skipped(p, prediction))


def phase_spec(stage, phase, prediction=None):
    """Everything train.py needs for one phase of one stage: its PHASE_TABLE row and what follows from it.
    prediction: the student's output, default x0 ("sample") in 2to1 (Sec. 3.7.3) and epsilon elsewhere;
    "epsilon" in 2to1 is the ablation without the x0 switch: a phase after the skipped convert phase starts
    where convert would have (the stage's init) and carries what convert would have carried (nothing)."""
    if stage not in STAGES:
        raise ValueError(f"lightning_min: unknown stage {stage!r}, valid: {list(STAGES)}")
    st = STAGES[stage]
    if phase not in stage_phases(stage, ablations=True):
        raise ValueError(f"lightning_min: stage {stage} has no phase {phase!r}, valid: "
                         f"{list(stage_phases(stage, ablations=True))}")
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"lightning_min: prediction {prediction!r}, valid: {list(PREDICTIONS)}")
    row = {r[1]: r for r in PHASE_TABLE if r[0] == stage}
    _, _, loss, lora, disc, steps, lr, betas, renoise, after, carry_lora, carry_disc = row[phase]
    while after is not None and skipped(after, prediction):
        after, carry_lora, carry_disc = row[after][9:]
    return PhaseSpec(
        stage=stage, phase=phase, loss=loss, lora=lora, discriminator=disc, teacher_steps=steps, lr=lr,
        betas=betas, renoise=renoise, n=st.n * steps // st.teacher_steps, cfg=st.cfg,
        student_prediction=prediction or ("sample" if stage == "2to1" else "epsilon"),
        teacher_prediction="epsilon", timesteps=tuple(student_timesteps(st.student_steps)),
        after=after, carry_lora=carry_lora, carry_disc=carry_disc)
