//! The noised CLIP's `config.json`: the image tower's resolution and widths,
//! the shared embedding width, the text encoder width the text tower reads,
//! and the number of diffusion timesteps its `t` input counts in.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::nn::config_file::{from_dir, from_json, invalid};
use crate::nn::error::Result;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoisedClipConfig {
    /// The side of the square images the image tower reads.
    pub image_size: i64,
    /// The channels of each resolution level; each level after the first
    /// halves the resolution.
    pub block_out_channels: Vec<i64>,
    /// ResNet blocks per level.
    pub layers_per_block: i64,
    /// The width D of the joint image-text embedding.
    pub embed_dim: i64,
    /// The hidden size of the frozen text encoder whose pooled state the text
    /// tower projects (384 for all-MiniLM-L6-v2).
    pub text_hidden_size: i64,
    /// The timesteps `t` is drawn from, 0..T: the noise schedule's length.
    pub num_train_timesteps: i64,
    /// GroupNorm groups; every level's channels must divide by it.
    #[serde(default = "default_groups")]
    pub norm_num_groups: i64,
}

fn default_groups() -> i64 {
    16
}

impl NoisedClipConfig {
    /// The `_class_name` written into `config.json`, checked when present.
    pub const CLASS_NAME: &'static str = "NoisedClipModel";

    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self = from_json(text, Self::CLASS_NAME)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config: Self = from_dir(dir, Self::CLASS_NAME)?;
        config.validate().map_err(|e| crate::nn::config_file::in_file(e, &dir.join("config.json")))?;
        Ok(config)
    }

    /// The config as `config.json` holds it, with its class name.
    pub fn to_json(&self) -> String {
        let mut value = serde_json::to_value(self).expect("a plain struct serialises");
        value["_class_name"] = Self::CLASS_NAME.into();
        serde_json::to_string_pretty(&value).expect("a JSON value serialises")
    }

    /// The width of the timestep embedding after its MLP: 4× the first
    /// level's channels, as in ADM.
    pub fn time_embed_dim(&self) -> i64 {
        4 * self.block_out_channels[0]
    }

    /// Checks that the numbers describe a buildable model; each error names
    /// the field and what it allows.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("image_size", self.image_size),
            ("layers_per_block", self.layers_per_block),
            ("embed_dim", self.embed_dim),
            ("text_hidden_size", self.text_hidden_size),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if value <= 0 {
                return Err(invalid(field, format!("must be positive, got {value}")));
            }
        }
        if self.num_train_timesteps < 2 {
            return Err(invalid("num_train_timesteps", format!("must be at least 2, got {}", self.num_train_timesteps)));
        }
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return Err(invalid("block_out_channels", "needs at least one level"));
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c <= 0 || c % self.norm_num_groups != 0) {
            return Err(invalid("block_out_channels", format!("{c} is not a positive multiple of norm_num_groups {}", self.norm_num_groups)));
        }
        // Each level after the first halves the side by 2×2 average pooling.
        let factor = 1i64 << (levels - 1).min(62);
        if self.image_size % factor != 0 {
            return Err(invalid("image_size", format!("{} must divide by 2^{} = {factor} for {levels} levels", self.image_size, levels - 1)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> NoisedClipConfig {
        NoisedClipConfig {
            image_size: 32,
            block_out_channels: vec![16, 32, 64],
            layers_per_block: 1,
            embed_dim: 32,
            text_hidden_size: 24,
            num_train_timesteps: 1000,
            norm_num_groups: 8,
        }
    }

    #[test]
    fn round_trips_through_json_with_its_class_name() {
        let text = base().to_json();
        assert!(text.contains("\"_class_name\": \"NoisedClipModel\""), "{text}");
        assert_eq!(NoisedClipConfig::from_json(&text).unwrap(), base());
        let err = NoisedClipConfig::from_json(&text.replace("NoisedClipModel", "UNet2DModel")).unwrap_err();
        assert!(err.to_string().contains("_class_name"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let check = |config: NoisedClipConfig, field: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        };
        check(NoisedClipConfig { image_size: 30, ..base() }, "image_size");
        check(NoisedClipConfig { block_out_channels: vec![16, 20], ..base() }, "block_out_channels");
        check(NoisedClipConfig { block_out_channels: vec![], ..base() }, "block_out_channels");
        check(NoisedClipConfig { embed_dim: 0, ..base() }, "embed_dim");
        check(NoisedClipConfig { num_train_timesteps: 1, ..base() }, "num_train_timesteps");
        let err = NoisedClipConfig::from_json(r#"{"image_size": 32, "colour": 1}"#).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
