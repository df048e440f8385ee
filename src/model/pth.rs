//! PyTorch `.pth` / `.pt` files as `torch.save` writes them (PyTorch ≥ 1.6): a zip archive
//! holding `<archive>/data.pkl` (the pickled object, read by [`super::pickle`]) and one record
//! `<archive>/data/<key>` per storage, plus `<archive>/byteorder` in newer versions.
//!
//! * [`PthFile`] — one memory-mapped file: its zip directory, the state dict's tensors
//!   (name → [`TensorRef`]), each checked against its storage's bytes at open time, and
//!   [`PthFile::load`] to convert one to an f32 candle tensor.
//!
//! The zip reader is hand-written rather than a dependency: torch writes every record *stored*
//! (uncompressed, 64-byte aligned), so reading the archive is only its central directory and
//! local headers (zip64 included, for files past 4 GiB), and the tensors are then slices of the
//! memory map — no copy, no decompression, no extra crate. Compressed or encrypted records are
//! refused. Every offset and length is checked against the file before it is used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::pickle::{Pickle, TensorRef, TorchDtype};
use crate::{Error, Result};

/// One record of a stored zip archive: where its bytes lie in the file.
#[derive(Debug, Clone, Copy)]
struct Record {
    start: usize,
    len: usize,
}

/// A `torch.save`d state dict, memory-mapped, with its tensors checked against their storages.
pub struct PthFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// Storage key → its record.
    storages: HashMap<String, Record>,
    tensors: HashMap<String, TensorRef>,
    /// State-dict order, for listing.
    order: Vec<String>,
}

impl PthFile {
    pub fn open(path: &Path) -> Result<PthFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping; as for safetensors (weights.rs), modifying the file while
        // eap runs is undefined and documented as such.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |message: String| Error::Pth {
            path: path.to_path_buf(),
            message,
        };
        if mmap.len() >= 2 && mmap[0] == 0x80 {
            return Err(bad(
                "this is the legacy (pre-1.6) torch.save format, a bare pickle; re-save it with \
                 a current PyTorch: `torch.save(torch.load(path), path)`"
                    .into(),
            ));
        }
        let records = read_zip(&mmap).map_err(bad)?;
        // The archive's folder is the file's stem as torch wrote it, which need not match the
        // file's current name: find the one `*/data.pkl` at the top level.
        let pkl: Vec<&String> = records
            .keys()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .collect();
        let pkl_name = match pkl.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(bad(
                    "no `<archive>/data.pkl` record: not a file torch.save wrote".into(),
                ))
            }
            _ => return Err(bad("several `*/data.pkl` records".into())),
        };
        let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
        if let Some(r) = records.get(&format!("{prefix}byteorder")) {
            let order = &mmap[r.start..r.start + r.len];
            if order != b"little" {
                return Err(bad(format!(
                    "byteorder {:?}: only little-endian files are read",
                    String::from_utf8_lossy(order)
                )));
            }
        }
        let r = records[&pkl_name];
        let pickle = Pickle::parse(&mmap[r.start..r.start + r.len], &path.join(&pkl_name))?;
        let entries = pickle.state_dict(path)?;
        let storages: HashMap<String, Record> = records
            .iter()
            .filter_map(|(name, r)| {
                name.strip_prefix(&prefix)
                    .and_then(|n| n.strip_prefix("data/"))
                    .map(|key| (key.to_string(), *r))
            })
            .collect();
        let mut tensors = HashMap::with_capacity(entries.len());
        let mut order = Vec::with_capacity(entries.len());
        for (name, t) in entries {
            let record = storages.get(&t.storage.key).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` uses storage `{}`, which the archive does not hold",
                    t.storage.key
                ))
            })?;
            check_view(&t, record.len).map_err(|why| bad(format!("tensor `{name}`: {why}")))?;
            if tensors.insert(name.clone(), t).is_some() {
                return Err(bad(format!("tensor `{name}` appears twice")));
            }
            order.push(name);
        }
        Ok(PthFile {
            path: path.to_path_buf(),
            mmap,
            storages,
            tensors,
            order,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The state dict's tensor names, in its order.
    pub fn names(&self) -> Vec<String> {
        self.order.clone()
    }

    /// Loads tensor `name`, checks its shape and converts it to f32 on `device`. Strided views
    /// (a transposed parameter saved as is) are gathered into a contiguous tensor.
    pub fn load(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        if t.shape != shape {
            return Err(Error::TensorShape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        let dtype = match t.storage.dtype {
            TorchDtype::F32 => DType::F32,
            TorchDtype::F16 => DType::F16,
            TorchDtype::BF16 => DType::BF16,
            TorchDtype::F64 => DType::F64,
            other => {
                return Err(Error::TensorDtype {
                    path: self.path.clone(),
                    name: name.to_string(),
                    dtype: other.name().to_string(),
                })
            }
        };
        let r = self.storages[&t.storage.key];
        let storage = &self.mmap[r.start..r.start + r.len];
        let size = t.storage.dtype.size();
        let numel: usize = t.shape.iter().product();
        let bytes: std::borrow::Cow<[u8]> = if numel == 0 {
            std::borrow::Cow::Borrowed(&[])
        } else if is_contiguous(&t.shape, &t.strides) {
            let start = t.offset as usize * size;
            std::borrow::Cow::Borrowed(&storage[start..start + numel * size])
        } else {
            let mut out = Vec::with_capacity(numel * size);
            let mut index = vec![0usize; t.shape.len()];
            for _ in 0..numel {
                let at = t.offset as usize
                    + index
                        .iter()
                        .zip(&t.strides)
                        .map(|(i, s)| i * s)
                        .sum::<usize>();
                out.extend_from_slice(&storage[at * size..(at + 1) * size]);
                for d in (0..index.len()).rev() {
                    index[d] += 1;
                    if index[d] < t.shape[d] {
                        break;
                    }
                    index[d] = 0;
                }
            }
            std::borrow::Cow::Owned(out)
        };
        let tensor = Tensor::from_raw_buffer(&bytes, dtype, &t.shape, device)?;
        Ok(tensor.to_dtype(DType::F32)?)
    }
}

fn is_contiguous(shape: &[usize], strides: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(n);
    }
    true
}

/// Checks that a view lies inside a storage record of `bytes` bytes: the storage's declared
/// size fits the record, the view's element count fits the storage (a view larger than its
/// storage would be a broadcast no state dict holds, and is how a lying shape would ask for a
/// huge allocation), and its last element lies inside.
fn check_view(t: &TensorRef, bytes: usize) -> std::result::Result<(), String> {
    let size = t.storage.dtype.size() as u64;
    let storage_bytes = t
        .storage
        .numel
        .checked_mul(size)
        .ok_or("storage size overflows")?;
    if storage_bytes > bytes as u64 {
        return Err(format!(
            "its storage `{}` claims {} elements ({storage_bytes} bytes) but the record holds \
             {bytes} bytes (truncated?)",
            t.storage.key, t.storage.numel
        ));
    }
    let numel = t
        .shape
        .iter()
        .try_fold(1u64, |acc, &n| acc.checked_mul(n as u64))
        .ok_or("its shape's element count overflows")?;
    if numel == 0 {
        return Ok(());
    }
    if numel > t.storage.numel {
        return Err(format!(
            "shape {:?} has {numel} elements but its storage holds {}",
            t.shape, t.storage.numel
        ));
    }
    let mut last = t.offset;
    for (&n, &s) in t.shape.iter().zip(&t.strides) {
        let step = (n as u64 - 1)
            .checked_mul(s as u64)
            .and_then(|x| last.checked_add(x))
            .ok_or("its strides overflow")?;
        last = step;
    }
    if last >= t.storage.numel {
        return Err(format!(
            "offset {} with shape {:?} and strides {:?} reaches element {last}, past the end \
             of its storage of {} elements",
            t.offset, t.shape, t.strides, t.storage.numel
        ));
    }
    Ok(())
}

// Little-endian fields; `None` past the end of `b` (offsets come from the file, so even the
// addition is checked).
fn le16(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at.checked_add(2)?)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as u64)
}

fn le32(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at.checked_add(4)?)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")) as u64)
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at.checked_add(8)?)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

const EOCD: u64 = 0x0605_4b50;
const ZIP64_LOCATOR: u64 = 0x0706_4b50;
const ZIP64_EOCD: u64 = 0x0606_4b50;
const CENTRAL: u64 = 0x0201_4b50;
const LOCAL: u64 = 0x0403_4b50;

/// The records of a stored (uncompressed) zip archive, name → bytes in `b`.
fn read_zip(b: &[u8]) -> std::result::Result<HashMap<String, Record>, String> {
    let truncated = |what: &str| format!("{what} lies past the end of the file (truncated?)");
    // The end-of-central-directory record is the last 22 bytes plus a comment of up to 64 KiB.
    let lowest = b.len().saturating_sub(22 + 0xffff);
    let eocd = (lowest..=b.len().saturating_sub(22))
        .rev()
        .find(|&i| le32(b, i) == Some(EOCD))
        .ok_or("not a zip archive (no end-of-central-directory record; truncated?)")?;
    let mut n_entries = le16(b, eocd + 10).ok_or_else(|| truncated("the directory"))?;
    let mut dir_len = le32(b, eocd + 12).ok_or_else(|| truncated("the directory"))?;
    let mut dir_start = le32(b, eocd + 16).ok_or_else(|| truncated("the directory"))?;
    if n_entries == 0xffff || dir_len == 0xffff_ffff || dir_start == 0xffff_ffff {
        // zip64: a locator just before the EOCD points at the zip64 EOCD record.
        let loc = eocd
            .checked_sub(20)
            .filter(|&l| le32(b, l) == Some(ZIP64_LOCATOR))
            .ok_or("zip64 sizes without a zip64 locator")?;
        let z = le64(b, loc + 8).ok_or_else(|| truncated("the zip64 locator"))? as usize;
        if le32(b, z) != Some(ZIP64_EOCD) {
            return Err("the zip64 locator points at no zip64 directory record".into());
        }
        n_entries = le64(b, z + 32).ok_or_else(|| truncated("the zip64 directory record"))?;
        dir_len = le64(b, z + 40).ok_or_else(|| truncated("the zip64 directory record"))?;
        dir_start = le64(b, z + 48).ok_or_else(|| truncated("the zip64 directory record"))?;
    }
    let dir_end = dir_start
        .checked_add(dir_len)
        .filter(|&e| e <= b.len() as u64)
        .ok_or_else(|| truncated("the central directory"))?;
    // Each directory entry is at least 46 bytes: a count beyond that is a lie, refused before
    // anything is allocated for it.
    if n_entries > dir_len / 46 {
        return Err(format!(
            "the directory claims {n_entries} entries in {dir_len} bytes"
        ));
    }
    let mut records = HashMap::with_capacity(n_entries as usize);
    let mut at = dir_start as usize;
    for _ in 0..n_entries {
        if at as u64 + 46 > dir_end || le32(b, at) != Some(CENTRAL) {
            return Err(format!("no directory entry at byte {at}"));
        }
        let flags = le16(b, at + 8).expect("in range");
        let method = le16(b, at + 10).expect("in range");
        let mut size = le32(b, at + 20).expect("in range");
        let mut usize_ = le32(b, at + 24).expect("in range");
        let name_len = le16(b, at + 28).expect("in range") as usize;
        let extra_len = le16(b, at + 30).expect("in range") as usize;
        let comment_len = le16(b, at + 32).expect("in range") as usize;
        let mut local = le32(b, at + 42).expect("in range");
        let name_end = at + 46 + name_len;
        let extra_end = name_end + extra_len;
        if (extra_end + comment_len) as u64 > dir_end {
            return Err(format!(
                "directory entry at byte {at} runs past the directory"
            ));
        }
        let name = std::str::from_utf8(&b[at + 46..name_end])
            .map_err(|_| format!("directory entry at byte {at} has a non-UTF-8 name"))?
            .to_string();
        // zip64 extended information: the 64-bit values of the fields set to 0xffffffff, in
        // the order uncompressed size, compressed size, local header offset.
        let mut e = name_end;
        while e + 4 <= extra_end {
            let id = le16(b, e).expect("in range");
            let len = le16(b, e + 2).expect("in range") as usize;
            let body = e + 4;
            if body + len > extra_end {
                break;
            }
            if id == 0x0001 {
                let mut f = body;
                let mut next = |v: &mut u64| {
                    if *v == 0xffff_ffff && f + 8 <= body + len {
                        *v = le64(b, f).expect("in range");
                        f += 8;
                    }
                };
                next(&mut usize_);
                next(&mut size);
                next(&mut local);
            }
            e = body + len;
        }
        if flags & 1 != 0 {
            return Err(format!("record `{name}` is encrypted"));
        }
        if method != 0 || size != usize_ {
            return Err(format!(
                "record `{name}` is compressed (method {method}); torch.save stores records \
                 uncompressed"
            ));
        }
        let local = local as usize;
        if le32(b, local) != Some(LOCAL) {
            return Err(format!("record `{name}`: no local header at byte {local}"));
        }
        let lname = le16(b, local + 26).ok_or_else(|| truncated("a local header"))? as usize;
        let lextra = le16(b, local + 28).ok_or_else(|| truncated("a local header"))? as usize;
        // `local` is inside the file (its signature was read), so this cannot overflow.
        let start = local + 30 + lname + lextra;
        let end = (start as u64)
            .checked_add(size)
            .filter(|&e| e <= b.len() as u64)
            .ok_or_else(|| truncated(&format!("record `{name}`")))?;
        records.insert(
            name,
            Record {
                start,
                len: (end - start as u64) as usize,
            },
        );
        at = extra_end + comment_len;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pickle::StorageRef;

    fn view(numel: u64, offset: u64, shape: &[usize], strides: &[usize]) -> TensorRef {
        TensorRef {
            storage: StorageRef {
                dtype: TorchDtype::F32,
                key: "0".into(),
                numel,
            },
            offset,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
        }
    }

    #[test]
    fn views_are_checked_against_their_storage() {
        assert!(check_view(&view(6, 0, &[2, 3], &[3, 1]), 24).is_ok());
        // Transposed view of the same storage.
        assert!(check_view(&view(6, 0, &[3, 2], &[1, 3]), 24).is_ok());
        let e = check_view(&view(6, 1, &[2, 3], &[3, 1]), 24).unwrap_err();
        assert!(e.contains("past the end"), "{e}");
        let e = check_view(&view(6, 0, &[2, 3], &[3, 1]), 20).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let e = check_view(&view(6, 0, &[1 << 20, 1 << 20], &[0, 0]), 24).unwrap_err();
        assert!(e.contains("elements"), "{e}");
        let e = check_view(&view(6, 0, &[2], &[usize::MAX]), 24).unwrap_err();
        assert!(e.contains("overflow") || e.contains("past the end"), "{e}");
    }

    #[test]
    fn not_a_zip() {
        let e = read_zip(b"hello world, not a zip archive at all").unwrap_err();
        assert!(e.contains("not a zip archive"), "{e}");
    }
}
