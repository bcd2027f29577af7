//! Replacing a run's checkpoint folder so that a crash at any moment leaves a
//! whole one behind: the new checkpoint is written to a fresh folder beside
//! it, the old one is moved aside, the new one renamed into place, and only
//! then is the old one removed (renames within one folder are atomic).

use std::path::Path;

/// Writes a new checkpoint into `ckpt` through `write`, which fills the
/// (empty) folder it is given.
pub(crate) fn replace(ckpt: &Path, write: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let sibling = |suffix: &str| {
        let mut name = ckpt.file_name().unwrap_or_default().to_os_string();
        name.push(suffix);
        ckpt.with_file_name(name)
    };
    let (tmp, old) = (sibling(".tmp"), sibling(".old"));
    let _ = std::fs::remove_dir_all(&tmp);
    write(&tmp)?;
    let _ = std::fs::remove_dir_all(&old);
    if ckpt.exists() {
        std::fs::rename(ckpt, &old)?;
    }
    std::fs::rename(&tmp, ckpt)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_replaced_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("diffusiond-ckpt-{}", std::process::id()));
        let ckpt = dir.join("checkpoint");
        std::fs::create_dir_all(&ckpt).unwrap();
        std::fs::write(ckpt.join("a"), "old").unwrap();
        // A failed write leaves the old checkpoint as it was.
        assert!(replace(&ckpt, |_| anyhow::bail!("disk full")).is_err());
        assert_eq!(std::fs::read_to_string(ckpt.join("a")).unwrap(), "old");
        replace(&ckpt, |tmp| {
            std::fs::create_dir_all(tmp)?;
            Ok(std::fs::write(tmp.join("b"), "new")?)
        })
        .unwrap();
        assert!(!ckpt.join("a").exists());
        assert_eq!(std::fs::read_to_string(ckpt.join("b")).unwrap(), "new");
        assert!(!dir.join("checkpoint.tmp").exists() && !dir.join("checkpoint.old").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
