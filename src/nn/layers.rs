//! Small pieces shared by the networks: activations by their config names, and
//! linear, convolution and GroupNorm layers whose result for one sample does
//! not depend on the batch around it.
//!
//! Activation names follow diffusers' `get_activation` and transformers'
//! `ACT2FN`, so a config's `act_fn` / `hidden_act` / `dense_act_fn` maps one to one.

use std::sync::Mutex;

use tch::{nn, Device, Kind, Tensor};

use super::precision::{cast, product_kind};

/// A linear layer (`weight` [out, in], `bias` [out], as in PyTorch) computed as
/// one matrix product per sample.
///
/// Why: a plain linear folds the batch into the rows of one GEMM, and BLAS picks
/// its kernel (and so its summation order) by the row count, so a sample's
/// result changes in the last bits with the batch around it. Batched products
/// of a fixed per-sample shape give the same bits for every batch of two or
/// more samples (measured over 120 shapes on the CPU), at the same speed, and
/// for one sample too wherever [`BatchOfOne`] finds so. An image is then
/// bit-identical whether generated alone or batched with other requests.
#[derive(Debug)]
pub struct Linear {
    pub ws: Tensor,
    pub bs: Option<Tensor>,
    single: BatchOfOne,
}

impl Linear {
    /// Creates `weight` and `bias` under `p` with PyTorch's default initialisation.
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64) -> Self {
        let plain = nn::linear(p, in_dim, out_dim, Default::default());
        Self { ws: plain.ws, bs: plain.bs, single: BatchOfOne::default() }
    }

    /// `[B, …, in] -> [B, …, out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.single.apply(x, |t| self.per_sample(t))
    }

    fn per_sample(&self, x: &Tensor) -> Tensor {
        let mut size = x.size();
        let (batch, in_dim) = (size[0], size[size.len() - 1]);
        let out_dim = self.ws.size()[0];
        let rows = if size.len() == 1 { x.reshape([1, 1, in_dim]) } else { x.reshape([batch, -1, in_dim]) };
        // Mixed precision (training only): the product in the reduced kind.
        let (rows, ws, bs) = match product_kind().filter(|&k| k != x.kind()) {
            Some(k) => (cast(&rows, k), cast(&self.ws, k), self.bs.as_ref().map(|b| cast(b, k))),
            None => (rows, self.ws.shallow_clone(), self.bs.as_ref().map(Tensor::shallow_clone)),
        };
        let weight = ws.tr().unsqueeze(0).expand([rows.size()[0], in_dim, out_dim], false);
        // The bias enters the product itself (one pass over the output, not two).
        let y = match &bs {
            Some(bs) => bs.baddbmm(&rows, &weight, 1.0, 1.0),
            None => rows.bmm(&weight),
        };
        let y = cast(&y, x.kind());
        let last = size.len() - 1;
        size[last] = out_dim;
        y.reshape(size)
    }
}

/// Where a batch of one gives the bits it has inside a larger batch, learned by
/// trying, per input shape and layout, precision, device and thread count.
///
/// Why: oneDNN (and cuDNN) pick a kernel by shape, the batch size included, and
/// at some shapes the batch-of-one kernel sums in another order (measured on an
/// AVX-512 CPU: the convolutions of 192 channels at 8×8 and of 48 → 96 or
/// 64 → 128 channels at 16×16 differ in the 6th digit, most other shapes are
/// exact). Doubling every single sample keeps the bits but doubles the work of
/// an unguided image; doubling it only where the first try shows a difference
/// keeps the bits at the cost of those layers alone. Layers that work row by
/// row (a convolution) can do better still: the sample's two halves, each with
/// the rows its kernel reaches across the cut, make a batch of two that takes
/// the batch kernel at little more than the single sample's work (measured:
/// every shape of `models/default` that differs alone is exact split).
#[derive(Debug, Default)]
pub struct BatchOfOne {
    verdicts: Mutex<Vec<(BatchKey, Route)>>,
}

/// How a batch of one is computed so that it gets a batch's bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// As it is: its own kernel sums as the batch kernel does.
    Alone,
    /// Its top and bottom halves (with their halo rows) as a batch of two.
    Split,
    /// Twice over as a batch of two, keeping the first.
    Doubled,
}

#[derive(Debug, Clone, PartialEq)]
struct BatchKey {
    shape: Vec<i64>,
    /// The layout too: a kernel may take another path for channels-last strides.
    strides: Vec<i64>,
    kind: Kind,
    device: Device,
    threads: i32,
}

impl BatchKey {
    fn of(x: &Tensor) -> Self {
        Self { shape: x.size(), strides: x.stride(), kind: x.kind(), device: x.device(), threads: tch::get_num_threads() }
    }
}

impl BatchOfOne {
    /// `f(x)`, where a batch of one (`x` with a leading dimension of 1) is
    /// computed alone if that is known to match a batch, else as `f` of `x`
    /// twice over, keeping the first half (trying alone too the first time).
    pub fn apply(&self, x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
        self.apply_with(x, None, f)
    }

    /// As [`BatchOfOne::apply`] for an `f` that works on `[N, C, H, W]` maps
    /// row by row, each output row reading `halo` input rows on either side
    /// (a stride-1 convolution with `halo` rows of zero padding): between
    /// alone and doubled it also tries the two halves as a batch.
    pub fn apply_rows(&self, x: &Tensor, halo: i64, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
        self.apply_with(x, Some(halo), f)
    }

    fn apply_with(&self, x: &Tensor, halo: Option<i64>, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
        if x.dim() < 2 || x.size()[0] != 1 {
            return f(x);
        }
        let x = &batch_strided(x);
        let f = &f;
        let doubled = || f(&twice(x)).narrow(0, 0, 1);
        let split = halo.filter(|&halo| splittable(x, halo)).map(|halo| move || split_rows(x, halo, f));
        match self.verdict(x) {
            Some(Route::Alone) => return f(x),
            Some(Route::Split) if split.is_some() => return split.as_ref().map(|s| s()).expect("checked"),
            Some(_) => return doubled(),
            None => {}
        }
        // The first call hands back the result of the route it records, so
        // that it runs the very computation later calls run: the same values
        // either way, and the same autograd graph for a gradient through it.
        let (one, two) = (f(x), doubled());
        let (route, result) = if same_result(&one, &two) {
            (Route::Alone, one)
        } else if let Some(halves) = split.as_ref().map(|s| s()).filter(|h| same_result(h, &two)) {
            (Route::Split, halves)
        } else {
            (Route::Doubled, two)
        };
        self.record(x, route);
        result
    }

    /// For a single sample `x`: `alone` computes its result, `doubled` computes
    /// it for `x` twice over and keeps the first half. Runs `alone` where that
    /// is known to match, else `doubled` (trying both the first time).
    pub fn try_run<E>(&self, x: &Tensor, alone: impl Fn() -> Result<Tensor, E>, doubled: impl Fn() -> Result<Tensor, E>) -> Result<Tensor, E> {
        match self.verdict(x) {
            Some(Route::Alone) => alone(),
            Some(_) => doubled(),
            None => {
                let (one, two) = (alone()?, doubled()?);
                let same = same_result(&one, &two);
                self.record(x, if same { Route::Alone } else { Route::Doubled });
                Ok(if same { one } else { two })
            }
        }
    }

    /// Whether the shape of `x` has been tried, and how it is computed since.
    pub fn verdict(&self, x: &Tensor) -> Option<Route> {
        let key = BatchKey::of(x);
        self.lock().iter().find(|(k, _)| *k == key).map(|(_, route)| *route)
    }

    fn record(&self, x: &Tensor, route: Route) {
        let key = BatchKey::of(x);
        let mut verdicts = self.lock();
        if !verdicts.iter().any(|(k, _)| *k == key) {
            tracing::debug!(shape = ?key.shape, threads = key.threads, ?route, "batch of one tried");
            verdicts.push((key, route));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(BatchKey, Route)>> {
        // The list is only ever appended to whole entries: a poisoned lock holds good data.
        self.verdicts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The same values in the same layout (the batch stride aside, which a batch
/// of one does not use).
fn same_result(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.stride().get(1..) == b.stride().get(1..) && a.equal(b)
}

/// Whether `x` ([1, C, H, W]) has two halves that each keep more rows of
/// their own than they borrow across the cut.
fn splittable(x: &Tensor, halo: i64) -> bool {
    let size = x.size();
    size.len() == 4 && halo >= 0 && size[2] % 2 == 0 && size[2] / 2 > halo
}

/// `f(x)` for a row-wise `f` (see [`BatchOfOne::apply_rows`]) computed as one
/// batch of the top and bottom halves of `x`, each with `halo` rows of the
/// other, the result laid out as `f` lays out a batch.
///
/// Rows that read across the cut see the true neighbours; the rows `f`
/// computes against its padding at the cut are the ones dropped.
fn split_rows(x: &Tensor, halo: i64, f: &impl Fn(&Tensor) -> Tensor) -> Tensor {
    let half = x.size()[2] / 2;
    let rows = half + halo;
    let halves = stack_like(x, &[x.narrow(2, 0, rows), x.narrow(2, half - halo, rows)]);
    let y = f(&halves);
    let mut size = y.size();
    size[0] = 1;
    size[2] = 2 * half;
    let out = Tensor::empty(size.as_slice(), (y.kind(), y.device()));
    let out = out.as_strided(size.as_slice(), dense_strides_like(&y, &size).as_slice(), None);
    out.narrow(2, 0, half).copy_(&y.narrow(0, 0, 1).narrow(2, 0, half));
    out.narrow(2, half, half).copy_(&y.narrow(0, 1, 1).narrow(2, halo, half));
    out
}

/// The strides of `x` with the batch stride one sample's extent, as it is
/// in any batch of two or more laid out like `x`.
fn batch_strides(x: &Tensor) -> Vec<i64> {
    let (size, mut strides) = (x.size(), x.stride());
    strides[0] = size.iter().zip(&strides).skip(1).map(|(n, s)| n * s).max().unwrap_or(1).max(1);
    strides
}

/// A batch of one with the batch stride it would have in a larger batch (the
/// same data, a view).
///
/// Why: a batch of one's own batch stride is arbitrary (a reshape after a
/// transpose leaves it at the channel count, say), and libtorch reads the
/// memory format off all four strides: a channels-last sample whose batch
/// stride is too small counts as contiguous, so convolutions and GroupNorm
/// take their NCHW kernels for it while the same sample in a batch takes the
/// channels-last ones, and the bits differ (measured: from the second down
/// block of `models/default`'s base stage onwards, in the 6th digit).
pub fn batch_strided(x: &Tensor) -> Tensor {
    if x.dim() < 2 || x.size()[0] != 1 {
        return x.shallow_clone();
    }
    let strides = batch_strides(x);
    if strides == x.stride() {
        return x.shallow_clone();
    }
    x.as_strided(x.size().as_slice(), strides.as_slice(), None)
}

/// A single sample `x` twice over along the batch, each copy laid out as `x`
/// is (channels-last stays channels-last).
///
/// Why: a batch of two made by `cat` is contiguous whatever `x` was, and
/// GroupNorm and convolutions take another kernel for channels-last input, so
/// the doubled sample would not get the bits it gets inside a real batch, whose
/// tensors keep the layout the layers before produced.
fn twice(x: &Tensor) -> Tensor {
    let (mut size, strides) = (x.size(), batch_strides(x));
    size[0] = 2;
    let out = Tensor::empty_strided(size.as_slice(), strides.as_slice(), (x.kind(), x.device()));
    for i in 0..2 {
        out.narrow(0, i, 1).copy_(x);
    }
    out
}

/// `parts` (batches of one, all of one size) as one batch, dense and with
/// its dimensions ordered in memory as `x`'s are.
fn stack_like(x: &Tensor, parts: &[Tensor]) -> Tensor {
    let mut size = parts[0].size();
    size[0] = parts.len() as i64;
    let strides = dense_strides_like(&batch_strided(x), &size);
    let out = Tensor::empty_strided(size.as_slice(), strides.as_slice(), (x.kind(), x.device()));
    for (i, part) in parts.iter().enumerate() {
        out.narrow(0, i as i64, 1).copy_(part);
    }
    out
}

/// The strides of a dense tensor of `size` whose dimensions lie in memory in
/// the order of `like`'s strides (outermost first; ties keep their order).
fn dense_strides_like(like: &Tensor, size: &[i64]) -> Vec<i64> {
    let order = {
        let strides = like.stride();
        let mut order: Vec<usize> = (0..size.len()).collect();
        order.sort_by_key(|&d| std::cmp::Reverse(strides[d]));
        order
    };
    let mut strides = vec![0; size.len()];
    let mut extent = 1;
    for &d in order.iter().rev() {
        strides[d] = extent;
        extent *= size[d].max(1);
    }
    strides
}

/// A 2-D convolution (`weight` [out, in, k, k], `bias` [out], as in PyTorch)
/// whose result for a batch of one is the one it has in any larger batch
/// (see [`BatchOfOne`]).
#[derive(Debug)]
pub struct Conv2d {
    pub inner: nn::Conv2D,
    /// The zero padding of each side (stride, dilation and groups are 1).
    padding: i64,
    single: BatchOfOne,
}

impl Conv2d {
    /// Creates `weight` and `bias` under `p`; `padding` keeps the map's size for odd kernels.
    pub fn new(p: nn::Path, in_channels: i64, out_channels: i64, kernel: i64) -> Self {
        let padding = (kernel - 1) / 2;
        let config = nn::ConvConfig { padding, ..Default::default() };
        Self { inner: nn::conv2d(p, in_channels, out_channels, kernel, config), padding, single: BatchOfOne::default() }
    }

    /// The plain convolution, its product in [`product_kind`] when one is set.
    fn convolve(&self, x: &Tensor) -> Tensor {
        let Some(k) = product_kind().filter(|&k| k != x.kind()) else { return x.apply(&self.inner) };
        let bias = self.inner.bs.as_ref().map(|b| cast(b, k));
        let y = cast(x, k).conv2d(&cast(&self.inner.ws, k), bias, [1, 1], [self.padding, self.padding], [1, 1], 1);
        cast(&y, x.kind())
    }
}

impl nn::Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Tensor {
        if x.dim() != 4 {
            return self.convolve(x);
        }
        self.single.apply_rows(x, self.padding, |t| self.convolve(t))
    }
}

/// GroupNorm (`weight`, `bias` [channels]) whose result for a batch of one is
/// the one it has in any larger batch (see [`BatchOfOne`]; measured: 128
/// channels in 16 groups at 16×16 differ in the 7th digit on an AVX-512 CPU).
#[derive(Debug)]
pub struct GroupNorm {
    pub inner: nn::GroupNorm,
    single: BatchOfOne,
}

impl GroupNorm {
    pub fn new(p: nn::Path, groups: i64, channels: i64, eps: f64) -> Self {
        let config = nn::GroupNormConfig { eps, ..Default::default() };
        Self { inner: nn::group_norm(p, groups, channels, config), single: BatchOfOne::default() }
    }
}

impl nn::Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.single.apply(x, |t| t.apply(&self.inner))
    }
}

/// An element-wise activation as named in diffusers and transformers configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// The exact, erf-based GELU (`nn.GELU()`, transformers' `"gelu"`).
    Gelu,
    /// The tanh approximation (transformers' `"gelu_new"`, `"gelu_pytorch_tanh"`; T5 v1.1).
    GeluTanh,
    Mish,
    Relu,
    /// x·σ(1.702·x), the GELU approximation of OpenAI's CLIP (`"quick_gelu"`).
    QuickGelu,
}

impl Activation {
    /// Parses a config name; `None` for names we do not implement.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "mish" => Self::Mish,
            "relu" => Self::Relu,
            "quick_gelu" => Self::QuickGelu,
            _ => return None,
        })
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
            Self::Mish => x.mish(),
            Self::Relu => x.relu(),
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
        }
    }
}

/// `x.apply_linear(&layer)`, reading like tch's `x.apply(&module)`.
pub trait ApplyLinear {
    fn apply_linear(&self, layer: &Linear) -> Tensor;
}

impl ApplyLinear for Tensor {
    fn apply_linear(&self, layer: &Linear) -> Tensor {
        layer.forward(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_pytorch_and_ignores_the_batch() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let ours = Linear::new(vs.root() / "a", 384, 256);
        let x = Tensor::randn([5, 7, 384], (tch::Kind::Float, tch::Device::Cpu));
        let want = x.linear(&ours.ws, ours.bs.as_ref());
        let got = ours.forward(&x);
        assert!((&got - want).abs().max().double_value(&[]) < 1e-5);
        for n in [2, 3, 4] {
            let part = ours.forward(&x.narrow(0, 0, n)).get(1);
            assert!(part.equal(&got.get(1)), "batch {n} changed sample 1");
        }
        assert_eq!(ours.forward(&Tensor::ones([3, 384], (tch::Kind::Float, tch::Device::Cpu))).size(), [3, 256]);
    }

    #[test]
    fn a_batch_of_one_gets_the_batch_stride_of_a_batch() {
        let opts = (tch::Kind::Float, tch::Device::Cpu);
        // [B, T, C] tokens back to a channels-last map, as attention does.
        let map = |b: i64| Tensor::randn([b, 64, 96], opts).transpose(1, 2).reshape([b, 96, 8, 8]);
        let one = map(1);
        assert_eq!(one.stride()[0], 96, "the reshape leaves the channel count");
        let fixed = batch_strided(&one);
        assert_eq!(fixed.stride(), map(2).stride());
        assert!(fixed.equal(&one));
        // Already a batch's strides, or a batch: untouched.
        let plain = Tensor::randn([1, 3, 4, 4], opts);
        assert_eq!(batch_strided(&plain).stride(), plain.stride());
        assert_eq!(batch_strided(&map(2)).stride(), map(2).stride());
    }

    #[test]
    fn a_single_sample_convolves_as_it_does_in_a_batch() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let opts = (tch::Kind::Float, tch::Device::Cpu);
        // 192 channels at 8×8 and 48 → 96 at 16×16 are shapes where oneDNN's
        // batch-of-one kernel differs on some CPUs; 5 rows cannot split.
        let shapes = [(192, 32, 8, 3), (192, 192, 8, 3), (48, 96, 16, 3), (64, 128, 16, 3), (192, 32, 8, 1), (48, 32, 32, 3), (6, 32, 64, 3), (8, 8, 5, 3)];
        for (layout, (inputs, outputs, side, kernel)) in ["nchw", "channels-last"].into_iter().flat_map(|l| shapes.map(|s| (l, s))) {
            let conv = Conv2d::new(vs.root() / format!("{layout}_{inputs}_{outputs}_{side}_{kernel}"), inputs, outputs, kernel);
            let x = Tensor::randn([3, inputs, side, side], opts);
            // Channels-last as attention hands it on.
            let x = if layout == "nchw" { x } else { x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]) };
            let batched = x.apply(&conv).get(0);
            for _ in 0..2 {
                // The first call tries both ways, the second uses the verdict.
                let alone = x.narrow(0, 0, 1).apply(&conv);
                assert!(alone.get(0).equal(&batched), "{inputs} → {outputs} channels at {side}², {layout}");
                assert_eq!(alone.stride()[1..], x.apply(&conv).stride()[1..], "{layout}: the layout of a batch");
            }
            let route = conv.single.verdict(&x.narrow(0, 0, 1)).expect("tried");
            assert!(side != 5 || route != Route::Split, "{side} rows cannot split");
            let plain = x.apply(&conv.inner);
            assert!((&plain.get(0) - &batched).abs().max().double_value(&[]) < 1e-5);
        }
    }

    #[test]
    fn split_rows_computes_the_whole_map_from_its_halves() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let opts = (tch::Kind::Float, tch::Device::Cpu);
        let conv = Conv2d::new(vs.root() / "c", 16, 8, 3);
        for channels_last in [false, true] {
            let x = Tensor::randn([1, 16, 10, 12], opts);
            let x = if channels_last { x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]) } else { x };
            let split = split_rows(&x, 1, &|t: &Tensor| t.apply(&conv.inner));
            let whole = x.apply(&conv.inner);
            assert_eq!(split.size(), whole.size());
            assert_eq!(split.stride()[1..], whole.stride()[1..], "channels-last {channels_last}");
            assert!((&split - &whole).abs().max().double_value(&[]) < 1e-5, "the rows at the cut see their true neighbours");
            // Row by row without a halo: exact.
            let doubled = |t: &Tensor| t * 2.0;
            assert!(split_rows(&x, 0, &doubled).equal(&(&x * 2.0)));
        }
        let map = |h: i64| Tensor::zeros([1, 4, h, 8], opts);
        assert!(splittable(&map(16), 1) && splittable(&map(4), 1) && splittable(&map(2), 0));
        assert!(!splittable(&map(15), 1) && !splittable(&map(2), 1) && !splittable(&Tensor::zeros([1, 4, 8], opts), 0));
    }

    #[test]
    fn a_doubled_sample_keeps_its_layout() {
        let opts = (tch::Kind::Float, tch::Device::Cpu);
        // Channels-last, as attention hands it on: [1, C, H, W] viewed from [1, H·W, C].
        let x = Tensor::randn([1, 16, 24], opts).transpose(1, 2).reshape([1, 24, 4, 4]);
        assert_eq!(x.stride()[1], 1);
        let two = twice(&x);
        assert_eq!(two.size(), [2, 24, 4, 4]);
        assert_eq!(two.stride(), [384, 1, 96, 24], "channels-last, one sample's extent apart");
        assert!(two.get(0).equal(&x.get(0)) && two.get(1).equal(&x.get(0)));
        let plain = Tensor::randn([1, 3, 5], opts);
        assert_eq!(twice(&plain).stride(), [15, 5, 1]);
    }

    #[test]
    fn bf16_products_stay_close_to_f32_and_train_f32_weights() {
        use crate::nn::precision::with_product_kind;
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let lin = Linear::new(vs.root() / "lin", 96, 64);
        let conv = Conv2d::new(vs.root() / "conv", 16, 8, 3);
        let opts = (Kind::Float, tch::Device::Cpu);
        let (x, img) = (Tensor::randn([4, 10, 96], opts), Tensor::randn([4, 16, 12, 12], opts));
        let (lin32, conv32) = (lin.forward(&x), img.apply(&conv));
        let (lin16, conv16) = with_product_kind(Some(Kind::BFloat16), || (lin.forward(&x), img.apply(&conv)));
        for (name, low, full) in [("linear", &lin16, &lin32), ("conv", &conv16, &conv32)] {
            assert_eq!(low.kind(), Kind::Float, "{name} hands back the input's kind");
            let rel = ((low - full).norm() / full.norm()).double_value(&[]);
            assert!(rel > 0.0 && rel < 1e-2, "{name}: relative error {rel}");
        }
        // Gradients reach the f32 weights through the casts.
        with_product_kind(Some(Kind::BFloat16), || (lin.forward(&x).sum(Kind::Float) + img.apply(&conv).sum(Kind::Float)).backward());
        for w in [&lin.ws, &conv.inner.ws] {
            assert_eq!(w.kind(), Kind::Float);
            assert!(w.grad().defined() && w.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
    }

    #[test]
    fn names_map_to_the_right_functions() {
        let x = Tensor::from_slice(&[-1.0f32, 0.5, 2.0]);
        let exact = Activation::from_name("gelu").unwrap().forward(&x);
        let approx = Activation::from_name("gelu_new").unwrap().forward(&x);
        // gelu(-1) = -0.158655 exactly; the tanh form gives -0.158808.
        assert!((exact.double_value(&[0]) + 0.158_655).abs() < 1e-6);
        assert!((approx.double_value(&[0]) + 0.158_808).abs() < 1e-6);
        assert_eq!(Activation::from_name("swish"), Some(Activation::Silu));
        let quick = Activation::from_name("quick_gelu").unwrap().forward(&x);
        assert!((quick.double_value(&[0]) + 1.0 / (1.0 + 1.702f64.exp())).abs() < 1e-6);
        assert_eq!(Activation::from_name("laplace"), None);
    }
}
