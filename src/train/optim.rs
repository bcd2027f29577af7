//! The optimiser state a training run needs to resume exactly: AdamW with its
//! moments, a linear learning-rate warm-up, global gradient-norm clipping and
//! an exponential moving average of the weights.
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
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, warmup_steps: 500, max_grad_norm: 1.0, ema_decay: 0.9999 }
    }
}

/// AdamW + warm-up + clipping + EMA over the trainable variables of a `VarStore`.
pub struct Optimizer {
    config: OptimConfig,
    /// (name, parameter) in a fixed order.
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    ema: Vec<Tensor>,
    step: u64,
}

/// What one step did, for logging.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub step: u64,
    pub lr: f64,
    /// The gradient norm before clipping.
    pub grad_norm: f64,
}

impl Optimizer {
    pub fn new(vs: &nn::VarStore, config: OptimConfig) -> Self {
        let params: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect::<BTreeMap<_, _>>().into_iter().collect();
        let zeros = |t: &Tensor| t.zeros_like().to_kind(Kind::Float);
        let m = params.iter().map(|(_, p)| zeros(p)).collect();
        let v = params.iter().map(|(_, p)| zeros(p)).collect();
        let ema = tch::no_grad(|| params.iter().map(|(_, p)| p.detach().to_kind(Kind::Float).copy()).collect());
        Self { config, params, m, v, ema, step: 0 }
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The learning rate at the current step (linear warm-up, then constant).
    pub fn lr(&self) -> f64 {
        let warm = self.config.warmup_steps.max(1) as f64;
        self.config.lr * ((self.step + 1) as f64 / warm).min(1.0)
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Clips, takes one AdamW step, updates the EMA.
    pub fn step(&mut self) -> StepReport {
        let lr = self.lr();
        let c = self.config;
        tch::no_grad(|| {
            let grads: Vec<Option<Tensor>> = self.params.iter().map(|(_, p)| Some(p.grad()).filter(Tensor::defined)).collect();
            // One device-to-host transfer for the norm, not one per parameter.
            let squares: Vec<Tensor> = grads.iter().flatten().map(|g| g.to_kind(Kind::Float).square().sum(Kind::Double)).collect();
            let grad_norm = if squares.is_empty() { 0.0 } else { Tensor::stack(&squares, 0).sum(Kind::Double).double_value(&[]).sqrt() };
            let clip = if grad_norm > c.max_grad_norm { c.max_grad_norm / (grad_norm + 1e-6) } else { 1.0 };
            self.step += 1;
            let t = self.step as i32;
            let ema_decay = c.ema_decay.min((1.0 + self.step as f64) / (10.0 + self.step as f64));
            let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
            for (i, g) in grads.iter().enumerate() {
                let Some(g) = g else { continue };
                let g = g.to_kind(Kind::Float) * clip;
                let p = &mut self.params[i].1;
                self.m[i] = &self.m[i] * c.beta1 + &g * (1.0 - c.beta1);
                self.v[i] = &self.v[i] * c.beta2 + g.square() * (1.0 - c.beta2);
                let update = (&self.m[i] / bc1) / ((&self.v[i] / bc2).sqrt() + c.eps);
                let decayed = p.to_kind(Kind::Float) * (1.0 - lr * c.weight_decay) - update * lr;
                p.copy_(&decayed.to_kind(p.kind()));
                self.ema[i] = &self.ema[i] * ema_decay + p.to_kind(Kind::Float) * (1.0 - ema_decay);
            }
            StepReport { step: self.step, lr, grad_norm }
        })
    }

    /// The EMA weights by variable name (what a checkpoint for sampling holds).
    pub fn ema(&self) -> BTreeMap<String, Tensor> {
        self.params.iter().zip(&self.ema).map(|((n, _), e)| (n.clone(), e.shallow_clone())).collect()
    }

    /// Writes the moments, the EMA and the step count to one safetensors file.
    pub fn save(&self, file: &Path) -> Result<(), NnError> {
        let mut out = BTreeMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].shallow_clone());
            out.insert(format!("v.{name}"), self.v[i].shallow_clone());
            out.insert(format!("ema.{name}"), self.ema[i].shallow_clone());
        }
        out.insert("step".to_owned(), Tensor::from_slice(&[self.step as i64]));
        weights::save_tensors(&out, file)
    }

    /// Restores what [`Optimizer::save`] wrote; every tensor must be there.
    pub fn load(&mut self, file: &Path) -> Result<(), NnError> {
        let mut saved = weights::read_all(file)?;
        let mut take = |key: String| {
            saved.remove(&key).ok_or_else(|| NnError::Mismatch { file: file.display().to_string(), detail: format!("missing {key}") })
        };
        for i in 0..self.params.len() {
            let (name, device) = (self.params[i].0.clone(), self.params[i].1.device());
            self.m[i] = take(format!("m.{name}"))?.to_device(device);
            self.v[i] = take(format!("v.{name}"))?.to_device(device);
            self.ema[i] = take(format!("ema.{name}"))?.to_device(device);
        }
        self.step = take("step".to_owned())?.int64_value(&[0]) as u64;
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
