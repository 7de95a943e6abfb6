//! Is a binary fully static? An image without a base has no dynamic loader and no shared library,
//! so a binary asking for either would fail to start (`no such file or directory` from execve).

use std::{fs, path::Path};

use anyhow::{bail, Context as _, Result};
use object::{
    elf::{FileHeader64, DT_NEEDED},
    read::elf::{Dyn as _, FileHeader as _, ProgramHeader as _},
    Endianness,
};

/// What the kernel and the dynamic loader would need besides the file itself.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Linkage {
    /// `PT_INTERP`: the program interpreter (dynamic loader) execve starts instead.
    pub interpreter: Option<String>,
    /// How many `DT_NEEDED` entries (shared libraries) the dynamic segment lists.
    pub needed: usize,
}

/// Reads the program headers of a 64-bit ELF file. A static-pie binary has a dynamic segment
/// (for its own relocations) but neither an interpreter nor a needed library.
pub fn linkage(data: &[u8]) -> Result<Linkage> {
    let header = FileHeader64::<Endianness>::parse(data)?;
    let endian = header.endian()?;
    let segments = header.program_headers(endian, data)?;
    if segments.is_empty() {
        // An object file or a library: nothing execve runs.
        bail!("no program headers");
    }
    let mut linkage = Linkage::default();
    for segment in segments {
        if let Some(interp) = segment.interpreter(endian, data)? {
            linkage.interpreter = Some(String::from_utf8_lossy(interp).into_owned());
        }
        if let Some(entries) = segment.dynamic(endian, data)? {
            linkage.needed += entries
                .iter()
                .filter(|d| d.tag(endian) == DT_NEEDED)
                .count();
        }
    }
    Ok(linkage)
}

/// Fails unless `path` is a fully static 64-bit ELF executable, naming what it would need.
pub fn check_static(path: &Path) -> Result<()> {
    let data = fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
    let linkage = linkage(&data)
        .with_context(|| format!("{} is not a 64-bit ELF executable", path.display()))?;
    if let Some(interp) = &linkage.interpreter {
        bail!(
            "{} is dynamically linked: it needs the program interpreter {interp} and {} shared \
             libraries, which an image without a base lacks (the build's -C target-feature=+crt-static \
             did not apply?)",
            path.display(),
            linkage.needed
        );
    }
    if linkage.needed > 0 {
        bail!(
            "{} needs {} shared libraries, which an image without a base lacks",
            path.display(),
            linkage.needed
        );
    }
    Ok(())
}
