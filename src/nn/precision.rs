//! Mixed precision on the CPU: the products of linear and convolution layers in
//! bfloat16, everything else in f32.
//!
//! libtorch's CPU autocast does this for Python (`torch.autocast("cpu",
//! torch.bfloat16)`), but tch exposes only the CUDA autocast switch, so the
//! layers of `nn::layers` ask [`product_kind`] themselves: inside
//! [`with_product_kind`] they cast their input, weight and bias to that kind,
//! multiply, and hand the result back in the input's kind. Norms, softmax,
//! activations and the loss stay in f32, and the weights themselves (and the
//! optimiser's state) are never stored in the reduced kind, as in any
//! mixed-precision recipe (Micikevicius et al. 2018; bfloat16 needs no loss
//! scaling, its exponent range being f32's).
//!
//! Why only for training: on CPUs with bfloat16 dot products (AVX-512 BF16,
//! AMX) the base UNet trains 1.55 times as fast this way (13.1–13.5 against
//! 8.2–8.7 images/s for two single-threaded runs side by side on a 2-core AMD
//! EPYC with `avx512_bf16`), but the results differ from f32 in the third
//! digit, and the server promises
//! diffusers' f32 numbers and bit-identical images alone and in a batch.
//! [`cpu_has_bf16`] tells whether the machine has such instructions: without
//! them oneDNN emulates bfloat16 and is slower than f32.

use std::cell::Cell;

use tch::{Kind, Tensor};

thread_local! {
    static PRODUCT_KIND: Cell<Option<Kind>> = const { Cell::new(None) };
}

/// The kind linear and convolution layers multiply in on this thread, when it
/// is not their input's.
pub fn product_kind() -> Option<Kind> {
    PRODUCT_KIND.with(Cell::get)
}

/// Runs `f` with the layers' products in `kind` (`None`: in the input's kind),
/// restoring the previous setting afterwards, even if `f` panics.
pub fn with_product_kind<T>(kind: Option<Kind>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Kind>);
    impl Drop for Restore {
        fn drop(&mut self) {
            PRODUCT_KIND.with(|k| k.set(self.0));
        }
    }
    let _restore = Restore(PRODUCT_KIND.with(|k| k.replace(kind)));
    f()
}

/// Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX-BF16),
/// read from `/proc/cpuinfo`; false where that file is missing.
pub fn cpu_has_bf16() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").map(|info| flags_have_bf16(&info)).unwrap_or(false)
}

fn flags_have_bf16(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .flat_map(|line| line.split_whitespace())
        .any(|flag| flag == "avx512_bf16" || flag == "amx_bf16")
}

/// `t` in `kind`, or `t` itself (shallow) when it already is.
pub(crate) fn cast(t: &Tensor, kind: Kind) -> Tensor {
    if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.to_kind(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_is_scoped_and_restored() {
        assert_eq!(product_kind(), None);
        let inner = with_product_kind(Some(Kind::BFloat16), || {
            let nested = with_product_kind(None, product_kind);
            (product_kind(), nested)
        });
        assert_eq!(inner, (Some(Kind::BFloat16), None));
        assert_eq!(product_kind(), None);
        let caught = std::panic::catch_unwind(|| with_product_kind(Some(Kind::BFloat16), || panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(product_kind(), None, "restored after a panic");
    }

    #[test]
    fn bf16_flags_are_read_from_cpuinfo() {
        assert!(flags_have_bf16("processor : 0\nflags : fpu avx2 avx512f avx512_bf16 sha_ni\n"));
        assert!(flags_have_bf16("flags\t\t: fpu amx_bf16 amx_tile\n"));
        assert!(!flags_have_bf16("flags : fpu avx2 avx512f avx512bw\nbugs : avx512_bf16\n"));
    }
}
