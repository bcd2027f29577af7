//! Which training timesteps a sampler of S steps visits.
//!
//! "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al.
//! 2023), Table 2 names the three spacings; DDIM (Song et al. 2021) §4.2 the
//! strided sub-sequence. The integer lists equal diffusers' exactly, including
//! numpy's round-half-to-even and its float `arange`.

use serde::{Deserialize, Serialize};

use super::error::{DiffusionError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// 0, k, 2k, … (k = T div S), plus `steps_offset`: never visits the last timestep.
    Leading,
    /// T−1, T−1−T/S, …: always starts from the noisiest timestep.
    Trailing,
    /// round(linspace(0, T−1, S)).
    Linspace,
}

/// Descending timesteps for DDPM and DDIM (diffusers' `set_timesteps`).
pub fn ddpm_timesteps(spacing: TimestepSpacing, n: usize, steps: usize, steps_offset: i64) -> Result<Vec<i64>> {
    check(n, steps)?;
    let ts: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (n - 1) as f64, steps).into_iter().map(round).collect(),
        TimestepSpacing::Leading => (0..steps).map(|i| (i * (n / steps)) as i64 + steps_offset).collect(),
        TimestepSpacing::Trailing => return Ok(trailing(n, steps)),
    };
    Ok(ts.into_iter().rev().collect())
}

/// Descending timesteps for DPM-Solver: S + 1 points with the last (t = 0) dropped,
/// since its final step goes to σ = 0 rather than to a timestep.
pub fn dpm_timesteps(spacing: TimestepSpacing, n: usize, steps: usize, steps_offset: i64) -> Result<Vec<i64>> {
    check(n, steps)?;
    let ts: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (n - 1) as f64, steps + 1).into_iter().map(round).collect(),
        TimestepSpacing::Leading => (0..=steps).map(|i| (i * (n / (steps + 1))) as i64 + steps_offset).collect(),
        TimestepSpacing::Trailing => return Ok(trailing(n, steps)),
    };
    Ok(ts.into_iter().skip(1).rev().collect())
}

/// Checks a caller-given list: strictly descending, inside 0..n.
pub fn check_custom(timesteps: &[i64], n: usize) -> Result<()> {
    if timesteps.is_empty() {
        return Err(DiffusionError::invalid("timesteps", "the list is empty"));
    }
    if let Some(t) = timesteps.iter().find(|&&t| t < 0 || t as usize >= n) {
        return Err(DiffusionError::invalid("timesteps", format!("{t} is outside 0..{n}")));
    }
    if timesteps.windows(2).any(|w| w[1] >= w[0]) {
        return Err(DiffusionError::invalid("timesteps", "must be strictly descending"));
    }
    Ok(())
}

fn check(n: usize, steps: usize) -> Result<()> {
    if steps == 0 || steps > n {
        return Err(DiffusionError::invalid("num_inference_steps", format!("must be in 1..={n}, got {steps}")));
    }
    Ok(())
}

/// round(arange(T, 0, −T/S)) − 1 with numpy's float arange: its length is
/// ceil(T / (T/S)) and element i is start + i·δ with δ = (start + step) − start.
fn trailing(n: usize, steps: usize) -> Vec<i64> {
    let start = n as f64;
    let step = -(n as f64 / steps as f64);
    let len = ((0.0 - start) / step).ceil() as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| round(start + i as f64 * delta) - 1).collect()
}

/// numpy's linspace: start + i·step, with the last point set to `end` exactly.
fn linspace(start: f64, end: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (end - start) / (num - 1) as f64;
    (0..num).map(|i| if i == num - 1 { end } else { start + i as f64 * step }).collect()
}

fn round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_starts_at_the_last_timestep() {
        let ts = ddpm_timesteps(TimestepSpacing::Trailing, 1000, 10, 0).unwrap();
        assert_eq!(ts, vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);
    }

    #[test]
    fn leading_and_linspace() {
        assert_eq!(ddpm_timesteps(TimestepSpacing::Leading, 1000, 4, 1).unwrap(), vec![751, 501, 251, 1]);
        assert_eq!(ddpm_timesteps(TimestepSpacing::Linspace, 1000, 4, 0).unwrap(), vec![999, 666, 333, 0]);
        assert_eq!(dpm_timesteps(TimestepSpacing::Linspace, 1000, 3, 0).unwrap(), vec![999, 666, 333]);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let e = ddpm_timesteps(TimestepSpacing::Leading, 1000, 0, 0).unwrap_err();
        assert!(e.to_string().contains("num_inference_steps"));
        assert!(check_custom(&[10, 10, 5], 1000).is_err());
        assert!(check_custom(&[1000, 5], 1000).is_err());
        assert!(check_custom(&[999, 5, 0], 1000).is_ok());
    }
}
