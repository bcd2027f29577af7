//! The optimiser state a training run needs to resume exactly: AdamW with its
//! moments, a linear learning-rate warm-up and an optional cool-down, global
//! gradient-norm clipping, an exponential moving average of the weights and,
//! for mixed precision, a dynamic loss scale.
//!
//! The learning rate is warm-up, then constant, then (when `cooldown_steps` is
//! set) a decay to zero over the run's last steps with the "1 − sqrt" shape of
//! Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed
//! Training Durations"): a constant rate followed by a short cool-down matches
//! a cosine schedule tuned to the run's length, yet the constant phase can be
//! extended from any checkpoint. That is what a CPU-trained model needs: a run
//! is continued for as long as there is time, then cooled down.
//!
//! AdamW is Loshchilov & Hutter 2019 in PyTorch's form (weight decay applied
//! to the parameter before the Adam step). We keep the moments ourselves rather
//! than use tch's optimiser because libtorch's optimiser state cannot be saved
//! from Rust, and a run on a 2-core CPU takes hours: it must stop and resume
//! with the same numbers. The EMA of the weights (decay 0.9999 in ADM) is what
//! gets shipped: it samples better than the raw weights. Its decay warms up as
//! min(decay, (1 + t)/(10 + t)), the rule of diffusers' `EMAModel`: with a fixed
//! 0.999 a run of a few thousand steps would still ship a noticeable share of
//! its random initialisation (0.999^560 ≈ 57% at step 560).
//!
//! All parameters live in one flat f32 buffer (each variable becomes a view of
//! its slice), and the moments and the EMA are flat buffers of the same layout:
//! a step is a dozen whole-buffer kernels instead of a dozen per parameter
//! tensor. On a GPU a small UNet's step is otherwise dominated by the launches
//! of thousands of tiny kernels.
//!
//! Mixed precision (Micikevicius et al. 2018, "Mixed Precision Training"): the
//! forward pass runs in fp16 under autocast while the master weights, moments
//! and EMA stay f32. The loss is multiplied by a scale before the backward pass
//! so that small gradients do not flush to zero in fp16; the step divides it
//! out, and a step whose gradients overflowed is skipped and the scale halved.
//! After `growth_interval` clean steps the scale doubles (PyTorch's
//! `GradScaler` defaults: 2¹⁶, ×2 every 2000 steps, ×0.5 on overflow).

use std::collections::BTreeMap;
use std::path::Path;

use tch::{nn, Kind, Tensor};

use crate::nn::weights;
use crate::nn::NnError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup_steps: u64,
    /// Gradients are scaled down when their global L2 norm exceeds this.
    pub max_grad_norm: f64,
    pub ema_decay: f64,
    /// The run's length in steps; the cool-down ends here.
    pub total_steps: u64,
    /// Steps at the end of the run over which the rate decays to zero (0: none).
    pub cooldown_steps: u64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, warmup_steps: 500, max_grad_norm: 1.0, ema_decay: 0.9999, total_steps: 0, cooldown_steps: 0 }
    }
}

/// The dynamic loss scale of mixed-precision training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    pub scale: f64,
    /// Steps applied since the scale last changed.
    pub clean_steps: u64,
    /// Clean steps after which the scale doubles.
    pub growth_interval: u64,
}

impl Default for LossScale {
    fn default() -> Self {
        Self { scale: 65536.0, clean_steps: 0, growth_interval: 2000 }
    }
}

/// Where one variable lives in the flat buffers.
struct Segment {
    name: String,
    offset: i64,
    shape: Vec<i64>,
}

impl Segment {
    fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    fn of(&self, flat: &Tensor) -> Tensor {
        flat.narrow(0, self.offset, self.numel()).view(self.shape.as_slice())
    }
}

/// AdamW + warm-up + clipping + EMA (+ loss scaling) over the trainable
/// variables of a `VarStore`.
pub struct Optimizer {
    config: OptimConfig,
    /// Sorted by name: the layout of the flat buffers.
    segments: Vec<Segment>,
    /// The variables (views of `flat`), in segment order.
    params: Vec<Tensor>,
    flat: Tensor,
    m: Tensor,
    v: Tensor,
    ema: Tensor,
    step: u64,
    loss_scale: Option<LossScale>,
}

/// What one step did, for logging.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub step: u64,
    pub lr: f64,
    /// The gradient norm before clipping (after unscaling).
    pub grad_norm: f64,
    /// False when the gradients overflowed and the step was skipped.
    pub applied: bool,
    /// The loss scale for the next step (mixed precision only).
    pub loss_scale: Option<f64>,
}

impl Optimizer {
    /// Takes over the trainable variables of `vs`: from here on each one is a
    /// view of the optimiser's flat f32 buffer (on the store's device).
    pub fn new(vs: &nn::VarStore, config: OptimConfig) -> Self {
        let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        let mut segments = Vec::with_capacity(vars.len());
        let mut offset = 0;
        for (name, t) in &vars {
            segments.push(Segment { name: name.clone(), offset, shape: t.size() });
            offset += t.numel() as i64;
        }
        let flat = Tensor::zeros([offset], (Kind::Float, vs.device()));
        let params = tch::no_grad(|| {
            segments
                .iter()
                .zip(vars.into_values())
                .map(|(s, mut p)| {
                    let slot = s.of(&flat);
                    slot.shallow_clone().copy_(&p.detach().to_kind(Kind::Float));
                    p.set_data(&slot);
                    p
                })
                .collect()
        });
        let (m, v) = (flat.zeros_like(), flat.zeros_like());
        let ema = tch::no_grad(|| flat.copy());
        Self { config, segments, params, flat, m, v, ema, step: 0, loss_scale: None }
    }

    /// Mixed precision: the caller multiplies the loss by [`Optimizer::loss_scale`]
    /// before the backward pass, and steps with overflowing gradients are skipped.
    pub fn with_loss_scaling(mut self, scale: LossScale) -> Self {
        self.loss_scale = Some(scale);
        self
    }

    /// What the loss is multiplied by before the backward pass (1 without loss scaling).
    pub fn loss_scale(&self) -> f64 {
        self.loss_scale.map_or(1.0, |s| s.scale)
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The learning rate of the next step: linear warm-up, constant, then the
    /// 1 − sqrt cool-down that reaches zero at step `total_steps`.
    pub fn lr(&self) -> f64 {
        let c = &self.config;
        let next = self.step + 1;
        let warm = (next as f64 / c.warmup_steps.max(1) as f64).min(1.0);
        let cool_start = c.total_steps.saturating_sub(c.cooldown_steps);
        let cool = if c.cooldown_steps > 0 && next > cool_start {
            let done = ((next - cool_start) as f64 / c.cooldown_steps as f64).min(1.0);
            1.0 - done.sqrt()
        } else {
            1.0
        };
        c.lr * warm * cool
    }

    pub fn zero_grad(&mut self) {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Unscales and clips the gradients, takes one AdamW step and updates the
    /// EMA, or, with loss scaling, skips the step if the gradients overflowed.
    /// Variables without a gradient are left alone, moments and EMA included.
    pub fn step(&mut self) -> StepReport {
        let lr = self.lr();
        let c = self.config;
        tch::no_grad(|| {
            let device = self.flat.device();
            let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
            let defined: Vec<bool> = grads.iter().map(Tensor::defined).collect();
            let parts: Vec<Tensor> = grads
                .iter()
                .zip(&self.segments)
                .map(|(g, s)| if g.defined() { g.to_kind(Kind::Float).reshape([-1]) } else { Tensor::zeros([s.numel()], (Kind::Float, device)) })
                .collect();
            let mut g = Tensor::cat(&parts, 0);
            let scale = self.loss_scale();
            if scale != 1.0 {
                g = g / scale;
            }
            // The one device-to-host transfer of the step; an overflow shows as inf or NaN.
            let grad_norm = g.square().sum(Kind::Double).double_value(&[]).sqrt();
            if let Some(ls) = &mut self.loss_scale {
                if !grad_norm.is_finite() {
                    ls.scale *= 0.5;
                    ls.clean_steps = 0;
                    return StepReport { step: self.step, lr, grad_norm, applied: false, loss_scale: Some(ls.scale) };
                }
                ls.clean_steps += 1;
                if ls.clean_steps >= ls.growth_interval {
                    ls.scale *= 2.0;
                    ls.clean_steps = 0;
                }
            }
            let clip = if grad_norm > c.max_grad_norm { c.max_grad_norm / (grad_norm + 1e-6) } else { 1.0 };
            if clip != 1.0 {
                g = g * clip;
            }
            self.step += 1;
            let t = self.step as i32;
            let ema_decay = c.ema_decay.min((1.0 + self.step as f64) / (10.0 + self.step as f64));
            let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
            let mut m = &self.m * c.beta1 + &g * (1.0 - c.beta1);
            let mut v = &self.v * c.beta2 + g.square() * (1.0 - c.beta2);
            let update = (&m / bc1) / ((&v / bc2).sqrt() + c.eps);
            let mut p = &self.flat * (1.0 - lr * c.weight_decay) - update * lr;
            let mut ema = &self.ema * ema_decay + &p * (1.0 - ema_decay);
            if defined.contains(&false) {
                let active: Vec<Tensor> =
                    defined.iter().zip(&self.segments).map(|(&d, s)| Tensor::full([s.numel()], i64::from(d), (Kind::Bool, device))).collect();
                let active = Tensor::cat(&active, 0);
                m = m.where_self(&active, &self.m);
                v = v.where_self(&active, &self.v);
                p = p.where_self(&active, &self.flat);
                ema = ema.where_self(&active, &self.ema);
            }
            // In place: the variables are views of `flat`.
            self.flat.copy_(&p);
            (self.m, self.v, self.ema) = (m, v, ema);
            StepReport { step: self.step, lr, grad_norm, applied: true, loss_scale: self.loss_scale.map(|s| s.scale) }
        })
    }

    /// Exchanges the live weights and the EMA weights in place; calling it
    /// again restores both. Validation scores the EMA (what a run exports)
    /// without a second copy of the model.
    pub fn swap_ema(&mut self) {
        tch::no_grad(|| {
            let live = self.flat.copy();
            self.flat.copy_(&self.ema);
            self.ema.copy_(&live);
        });
    }

    /// The EMA weights by variable name (what a checkpoint for sampling holds).
    pub fn ema(&self) -> BTreeMap<String, Tensor> {
        self.segments.iter().map(|s| (s.name.clone(), s.of(&self.ema))).collect()
    }

    /// Writes the moments, the EMA, the step count and the loss scale to one
    /// safetensors file, by variable name.
    pub fn save(&self, file: &Path) -> Result<(), NnError> {
        let mut out = BTreeMap::new();
        for s in &self.segments {
            out.insert(format!("m.{}", s.name), s.of(&self.m));
            out.insert(format!("v.{}", s.name), s.of(&self.v));
            out.insert(format!("ema.{}", s.name), s.of(&self.ema));
        }
        out.insert("step".to_owned(), Tensor::from_slice(&[self.step as i64]));
        if let Some(ls) = self.loss_scale {
            out.insert("loss_scale".to_owned(), Tensor::from_slice(&[ls.scale]));
            out.insert("loss_scale.clean_steps".to_owned(), Tensor::from_slice(&[ls.clean_steps as i64]));
        }
        weights::save_tensors(&out, file)
    }

    /// Restores what [`Optimizer::save`] wrote; every moment and EMA tensor
    /// must be there. A loss scale is restored when this optimiser scales and
    /// the file has one (a run may switch between f32 and mixed precision).
    pub fn load(&mut self, file: &Path) -> Result<(), NnError> {
        let mut saved = weights::read_all(file)?;
        let mut take = |key: String| {
            saved.remove(&key).ok_or_else(|| NnError::Mismatch { file: file.display().to_string(), detail: format!("missing {key}") })
        };
        tch::no_grad(|| {
            for s in &self.segments {
                for (prefix, flat) in [("m", &self.m), ("v", &self.v), ("ema", &self.ema)] {
                    let value = take(format!("{prefix}.{}", s.name))?;
                    if value.size() != s.shape {
                        return Err(NnError::Mismatch {
                            file: file.display().to_string(),
                            detail: format!("{prefix}.{}: shape {:?}, expected {:?}", s.name, value.size(), s.shape),
                        });
                    }
                    s.of(flat).copy_(&value.to_kind(Kind::Float));
                }
            }
            Ok(())
        })?;
        self.step = take("step".to_owned())?.int64_value(&[0]) as u64;
        if let Some(ls) = &mut self.loss_scale {
            if let (Ok(scale), Ok(clean)) = (take("loss_scale".to_owned()), take("loss_scale.clean_steps".to_owned())) {
                ls.scale = scale.double_value(&[0]);
                ls.clean_steps = clean.int64_value(&[0]) as u64;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::OptimizerConfig;
    use tch::Device;

    /// A least-squares problem built without the global RNG (tests run in
    /// parallel threads and would race on it).
    fn problem(seed: i64) -> (nn::VarStore, nn::Linear, Tensor, Tensor) {
        let values = |n: i64, k: f64| (Tensor::arange(n, (Kind::Float, Device::Cpu)) * k + seed as f64).sin();
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root() / "lin", 4, 3, Default::default());
        tch::no_grad(|| {
            lin.ws.shallow_clone().copy_(&values(12, 0.7).view([3, 4]));
            lin.bs.as_ref().expect("bias").shallow_clone().copy_(&values(3, 1.3));
        });
        (vs, lin, values(64, 0.37).view([16, 4]) * 2.0, values(48, 0.91).view([16, 3]))
    }

    fn loss(lin: &nn::Linear, x: &Tensor, y: &Tensor) -> Tensor {
        (x.apply(lin) - y).square().mean(Kind::Float)
    }

    #[test]
    fn matches_libtorch_adamw() {
        let config = OptimConfig { lr: 1e-2, warmup_steps: 1, max_grad_norm: 1e9, ..Default::default() };
        let (vs_a, lin_a, x, y) = problem(1);
        let (vs_b, lin_b, _, _) = problem(1);
        let mut ours = Optimizer::new(&vs_a, config);
        let adamw = nn::AdamW { beta1: config.beta1, beta2: config.beta2, wd: config.weight_decay, eps: config.eps, amsgrad: false };
        let mut theirs = adamw.build(&vs_b, config.lr).unwrap();
        for _ in 0..20 {
            ours.zero_grad();
            loss(&lin_a, &x, &y).backward();
            ours.step();
            theirs.backward_step(&loss(&lin_b, &x, &y));
        }
        let diff = (&lin_a.ws - &lin_b.ws).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "weights differ by {diff}");
    }

    #[test]
    fn warm_up_clipping_and_ema() {
        let config = OptimConfig { lr: 1.0, warmup_steps: 4, max_grad_norm: 0.5, ema_decay: 0.5, ..Default::default() };
        let (vs, lin, x, y) = problem(2);
        let mut opt = Optimizer::new(&vs, config);
        assert!((opt.lr() - 0.25).abs() < 1e-12);
        let before = lin.ws.copy();
        loss(&lin, &x, &y).backward();
        let report = opt.step();
        assert!(report.grad_norm > 0.5, "the test needs a gradient worth clipping");
        // Step 1: the decay is still warming up, min(0.5, 2/11).
        let d = 2.0 / 11.0;
        let want = &before * d + &lin.ws * (1.0 - d);
        assert!((opt.ema()["lin.weight"].shallow_clone() - want).abs().max().double_value(&[]) < 1e-6);
        assert!((opt.lr() - 0.5).abs() < 1e-12);
        // From step 8 on ((1 + 8)/(10 + 8) = 0.5) the configured decay holds.
        for _ in 0..7 {
            opt.zero_grad();
            loss(&lin, &x, &y).backward();
            opt.step();
        }
        let (ema, prev) = (opt.ema()["lin.weight"].copy(), lin.ws.copy());
        opt.zero_grad();
        loss(&lin, &x, &y).backward();
        opt.step();
        let want = &ema * 0.5 + &lin.ws * 0.5;
        assert!(!prev.equal(&lin.ws));
        assert!((opt.ema()["lin.weight"].shallow_clone() - want).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn loss_scaling_unscales_and_skips_overflowing_steps() {
        let config = OptimConfig { lr: 1e-2, warmup_steps: 1, max_grad_norm: 1e9, ..Default::default() };
        let (vs_a, lin_a, x, y) = problem(4);
        let (vs_b, lin_b, _, _) = problem(4);
        let mut plain = Optimizer::new(&vs_a, config);
        let mut scaled = Optimizer::new(&vs_b, config).with_loss_scaling(LossScale { scale: 1024.0, clean_steps: 0, growth_interval: 3 });
        for _ in 0..3 {
            plain.zero_grad();
            loss(&lin_a, &x, &y).backward();
            plain.step();
            scaled.zero_grad();
            (loss(&lin_b, &x, &y) * scaled.loss_scale()).backward();
            assert!(scaled.step().applied);
        }
        // A power-of-two scale divides out exactly.
        assert!(lin_a.ws.equal(&lin_b.ws) && lin_a.bs.as_ref().unwrap().equal(lin_b.bs.as_ref().unwrap()));
        assert_eq!(scaled.loss_scale(), 2048.0, "three clean steps double the scale");
        // An overflow: no update, no step counted, the scale halves.
        let before = lin_b.ws.copy();
        scaled.zero_grad();
        (loss(&lin_b, &x, &y) * f64::INFINITY).backward();
        let report = scaled.step();
        assert!(!report.applied && !report.grad_norm.is_finite());
        assert_eq!((scaled.step_count(), scaled.loss_scale()), (3, 1024.0));
        assert!(lin_b.ws.equal(&before));
    }

    #[test]
    fn variables_without_a_gradient_are_left_alone() {
        let config = OptimConfig { lr: 1e-2, warmup_steps: 1, ..Default::default() };
        let vs = nn::VarStore::new(Device::Cpu);
        let used = vs.root().var("used", &[3], nn::Init::Const(1.0));
        let unused = vs.root().var("unused", &[2], nn::Init::Const(1.0));
        let mut opt = Optimizer::new(&vs, config);
        for _ in 0..3 {
            opt.zero_grad();
            used.square().sum(Kind::Float).backward();
            opt.step();
        }
        assert!(used.double_value(&[0]) < 1.0);
        assert!(unused.equal(&Tensor::ones([2], (Kind::Float, Device::Cpu))));
        assert!(opt.ema()["unused"].equal(&Tensor::ones([2], (Kind::Float, Device::Cpu))));
    }

    #[test]
    fn swapping_in_the_ema_twice_restores_both() {
        let config = OptimConfig { lr: 1e-1, warmup_steps: 1, ema_decay: 0.9, ..Default::default() };
        let (vs, lin, x, y) = problem(5);
        let mut opt = Optimizer::new(&vs, config);
        for _ in 0..5 {
            opt.zero_grad();
            loss(&lin, &x, &y).backward();
            opt.step();
        }
        let (live, ema) = (lin.ws.copy(), opt.ema()["lin.weight"].copy());
        assert!(!live.equal(&ema), "the test needs an EMA that lags");
        opt.swap_ema();
        // The model's own variables now hold the EMA.
        assert!(lin.ws.equal(&ema) && opt.ema()["lin.weight"].equal(&live));
        opt.swap_ema();
        assert!(lin.ws.equal(&live) && opt.ema()["lin.weight"].equal(&ema));
    }

    #[test]
    fn the_rate_warms_up_holds_then_cools_down_to_zero() {
        let config = OptimConfig { lr: 2.0, warmup_steps: 2, total_steps: 10, cooldown_steps: 4, ..Default::default() };
        let (vs, _, _, _) = problem(1);
        let mut opt = Optimizer::new(&vs, config);
        let mut rates = Vec::new();
        for step in 0..11 {
            opt.step = step;
            rates.push(opt.lr());
        }
        // Steps 1..=10: warm-up to step 2, constant to step 6, then 2·(1 − sqrt(k/4)) for k = 1..=4.
        let cool = |k: f64| 2.0 * (1.0 - (k / 4.0).sqrt());
        let expected = [1.0, 2.0, 2.0, 2.0, 2.0, 2.0, cool(1.0), cool(2.0), cool(3.0), 0.0, 0.0];
        for (i, (got, want)) in rates.iter().zip(expected).enumerate() {
            assert!((got - want).abs() < 1e-12, "step {}: lr {got}, expected {want}", i + 1);
        }
        // Without a cool-down the rate stays constant past the run's length.
        opt.config.cooldown_steps = 0;
        assert_eq!(opt.lr(), 2.0);
    }

    #[test]
    fn save_and_load_resume_exactly() {
        let config = OptimConfig { lr: 1e-2, warmup_steps: 3, ..Default::default() };
        let file = std::env::temp_dir().join(format!("diffusiond-optim-{}.safetensors", std::process::id()));
        let run = |steps: usize| {
            let (vs, lin, x, y) = problem(3);
            let mut opt = Optimizer::new(&vs, config);
            for _ in 0..steps {
                opt.zero_grad();
                loss(&lin, &x, &y).backward();
                opt.step();
            }
            (vs, lin, opt, x, y)
        };
        // Straight through: 6 steps.
        let (_, lin_full, _, _, _) = run(6);
        // 3 steps, save weights and state, then 3 more in a fresh optimiser.
        let (vs, _lin, opt, x, y) = run(3);
        let weights_file = file.with_extension("weights.safetensors");
        weights::save(&vs, &weights_file, Kind::Float).unwrap();
        opt.save(&file).unwrap();
        let (vs2, lin2, _, _) = problem(99);
        weights::load_into(&vs2, std::slice::from_ref(&weights_file), &|_| false).unwrap();
        let mut opt2 = Optimizer::new(&vs2, config);
        opt2.load(&file).unwrap();
        assert_eq!(opt2.step_count(), 3);
        for _ in 0..3 {
            opt2.zero_grad();
            loss(&lin2, &x, &y).backward();
            opt2.step();
        }
        let _ = (std::fs::remove_file(&file), std::fs::remove_file(&weights_file));
        assert!(lin2.ws.equal(&lin_full.ws), "resumed run differs from the uninterrupted one");
    }
}
