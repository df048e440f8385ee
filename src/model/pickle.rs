//! A data-only reader for Python pickles (protocols 2–5), for the files PyTorch and InterpBench
//! write: a state dict's `data.pkl` inside a `.pth` ([`super::pth`]), a pickled
//! TransformerLens config (`ll_model_cfg.pkl`, a dict or a `HookedTransformerConfig` object)
//! and a pickled edge list (`edges.pkl`).
//!
//! Pickle is a small stack machine whose `GLOBAL` + `REDUCE` opcodes import and call arbitrary
//! Python callables; `pickle.load` on an untrusted file runs whatever it names (`os.system`).
//! This reader never runs anything: it interprets the opcodes that build plain data (numbers,
//! strings, lists, tuples, dicts, sets) and accepts global names only from [`resolve_global`]'s
//! short allow-list — the tensor-rebuild functions and storage types `torch.save` uses,
//! `collections.OrderedDict`, `torch.float32`-style dtypes, `torch.device` and the
//! TransformerLens config class, whose state is read as plain data. A call is "applied" by
//! building the value it would return, and only for those names; anything else — an unknown
//! opcode, a global outside the list, a call of a non-callable — is an [`Error::Pickle`] that
//! names the opcode or the global and its byte offset.
//!
//! Objects live in an arena ([`Pickle::get`] by [`Id`]) so that the memo shares objects the
//! way Python's does (a dict filled by `SETITEMS` after it was memoised is the same dict) and a
//! hostile file cannot multiply memory by re-fetching one big object many times: every opcode
//! creates at most one arena entry, so the arena is bounded by the file's length. Length fields
//! are checked against the bytes that remain before anything is allocated. Converting to JSON
//! ([`Pickle::to_json`]) is bounded in depth and size, which also stops self-referencing lists.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::{Error, Result};

/// An object's index in a [`Pickle`]'s arena.
pub type Id = usize;

/// Element types of PyTorch storages (`torch.FloatStorage`, …) and of `torch.float32`-style
/// dtype objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchDtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl TorchDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TorchDtype::F64 | TorchDtype::I64 => 8,
            TorchDtype::F32 | TorchDtype::I32 => 4,
            TorchDtype::F16 | TorchDtype::BF16 | TorchDtype::I16 => 2,
            TorchDtype::I8 | TorchDtype::U8 | TorchDtype::Bool => 1,
        }
    }

    /// PyTorch's name (`float32`).
    pub fn name(self) -> &'static str {
        match self {
            TorchDtype::F32 => "float32",
            TorchDtype::F16 => "float16",
            TorchDtype::BF16 => "bfloat16",
            TorchDtype::F64 => "float64",
            TorchDtype::I64 => "int64",
            TorchDtype::I32 => "int32",
            TorchDtype::I16 => "int16",
            TorchDtype::I8 => "int8",
            TorchDtype::U8 => "uint8",
            TorchDtype::Bool => "bool",
        }
    }

    fn from_storage(name: &str) -> Option<TorchDtype> {
        Some(match name {
            "FloatStorage" => TorchDtype::F32,
            "HalfStorage" => TorchDtype::F16,
            "BFloat16Storage" => TorchDtype::BF16,
            "DoubleStorage" => TorchDtype::F64,
            "LongStorage" => TorchDtype::I64,
            "IntStorage" => TorchDtype::I32,
            "ShortStorage" => TorchDtype::I16,
            "CharStorage" => TorchDtype::I8,
            "ByteStorage" => TorchDtype::U8,
            "BoolStorage" => TorchDtype::Bool,
            _ => return None,
        })
    }

    fn from_dtype(name: &str) -> Option<TorchDtype> {
        Some(match name {
            "float32" | "float" => TorchDtype::F32,
            "float16" | "half" => TorchDtype::F16,
            "bfloat16" => TorchDtype::BF16,
            "float64" | "double" => TorchDtype::F64,
            "int64" | "long" => TorchDtype::I64,
            "int32" | "int" => TorchDtype::I32,
            "int16" | "short" => TorchDtype::I16,
            "int8" => TorchDtype::I8,
            "uint8" => TorchDtype::U8,
            "bool" => TorchDtype::Bool,
            _ => return None,
        })
    }
}

/// The global names a pickle may refer to (everything else is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter(tensor, requires_grad, hooks)`: the tensor itself.
    RebuildParameter,
    /// `collections.OrderedDict`: a dict.
    OrderedDict,
    /// `builtins.set` / `frozenset`: read as a list.
    Set,
    /// `torch.FloatStorage` and friends, named in a storage's persistent id.
    Storage(TorchDtype),
    /// `torch.float32` and friends, as a config's `dtype` field holds them.
    Dtype(TorchDtype),
    /// `torch.device('cpu')`: read as its string.
    Device,
    /// `transformer_lens.HookedTransformerConfig.HookedTransformerConfig`: an object whose
    /// `BUILD` state (its `__dict__`) is read as a plain dict.
    TlConfig,
}

impl Global {
    /// The Python name, for messages.
    pub fn python_name(self) -> String {
        match self {
            Global::RebuildTensor => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::Set => "builtins.set".into(),
            Global::Storage(d) => format!("torch storage of {}", d.name()),
            Global::Dtype(d) => format!("torch.{}", d.name()),
            Global::Device => "torch.device".into(),
            Global::TlConfig => {
                "transformer_lens.HookedTransformerConfig.HookedTransformerConfig".into()
            }
        }
    }
}

/// The allow-list: the [`Global`] for `module.name`, or `None` for anything else.
pub fn resolve_global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("collections", "OrderedDict") => Global::OrderedDict,
        // Protocol 2 spells Python 3's `builtins` as `__builtin__`.
        ("builtins" | "__builtin__", "set" | "frozenset") => Global::Set,
        ("torch", "device") => Global::Device,
        ("torch", n) if n.ends_with("Storage") => Global::Storage(TorchDtype::from_storage(n)?),
        ("torch", n) => Global::Dtype(TorchDtype::from_dtype(n)?),
        (
            "transformer_lens.HookedTransformerConfig" | "transformer_lens",
            "HookedTransformerConfig",
        ) => Global::TlConfig,
        _ => return None,
    })
}

/// A storage named by a persistent id: `('storage', torch.FloatStorage, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub dtype: TorchDtype,
    /// The record `data/<key>` of the archive that holds the bytes.
    pub key: String,
    /// Elements of `dtype` in the storage.
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// In elements.
    pub offset: u64,
    pub shape: Vec<usize>,
    /// In elements.
    pub strides: Vec<usize>,
}

/// One object of the arena.
#[derive(Debug, Clone, PartialEq)]
pub enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    /// Insertion order kept (Python dicts are ordered).
    Dict(Vec<(Id, Id)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// An instance of an allowed class with the state `BUILD` gave it.
    Object {
        class: Global,
        state: Option<Id>,
    },
}

/// A parsed pickle: the arena and the object `STOP` returned.
#[derive(Debug)]
pub struct Pickle {
    objs: Vec<Obj>,
    root: Id,
}

/// Converting a pickle to JSON stops at this depth and this many objects.
const JSON_DEPTH: usize = 64;
const JSON_OBJECTS: usize = 1 << 20;

impl Pickle {
    /// Interprets `bytes`; `path` is named in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Pickle> {
        Machine {
            bytes,
            pos: 0,
            path,
            objs: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            dict_keys: HashMap::new(),
        }
        .run()
    }

    /// Reads and interprets a file.
    pub fn read(path: &Path) -> Result<Pickle> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, path)
    }

    pub fn root(&self) -> Id {
        self.root
    }

    pub fn get(&self, id: Id) -> &Obj {
        &self.objs[id]
    }

    /// The string `id` holds, if it is one.
    pub fn str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The items of a list, tuple or set.
    pub fn items(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Obj::List(v) | Obj::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// What `id` is, for error messages.
    pub fn kind(&self, id: Id) -> &'static str {
        match self.get(id) {
            Obj::None => "None",
            Obj::Bool(_) => "a bool",
            Obj::Int(_) => "an int",
            Obj::Float(_) => "a float",
            Obj::Str(_) => "a string",
            Obj::Bytes(_) => "bytes",
            Obj::List(_) => "a list",
            Obj::Tuple(_) => "a tuple",
            Obj::Dict(_) => "a dict",
            Obj::Global(_) => "a class or function",
            Obj::Storage(_) => "a storage",
            Obj::Tensor(_) => "a tensor",
            Obj::Object { .. } => "an object",
        }
    }

    /// Plain data as JSON: dicts (keys as strings), lists, tuples and sets as arrays, dtypes as
    /// `"torch.float32"`, a TransformerLens config object as the dict of its fields. Non-finite
    /// floats become the strings `"nan"`, `"inf"`, `"-inf"` (JSON has no such numbers), so a
    /// field that needs a number reports them. Tensors, storages and bytes are refused.
    pub fn to_json(&self, id: Id) -> std::result::Result<Json, String> {
        let mut budget = JSON_OBJECTS;
        self.json(id, 0, &mut budget)
    }

    fn json(&self, id: Id, depth: usize, budget: &mut usize) -> std::result::Result<Json, String> {
        if depth > JSON_DEPTH {
            return Err(format!(
                "nested deeper than {JSON_DEPTH} levels (a self-referencing object?)"
            ));
        }
        if *budget == 0 {
            return Err(format!("more than {JSON_OBJECTS} objects"));
        }
        *budget -= 1;
        Ok(match self.get(id) {
            Obj::None => Json::Null,
            Obj::Bool(b) => Json::Bool(*b),
            Obj::Int(i) => Json::from(*i),
            Obj::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(n) => Json::Number(n),
                None if f.is_nan() => Json::from("nan"),
                None if *f > 0.0 => Json::from("inf"),
                None => Json::from("-inf"),
            },
            Obj::Str(s) => Json::from(s.as_str()),
            Obj::List(v) | Obj::Tuple(v) => Json::Array(
                v.iter()
                    .map(|&i| self.json(i, depth + 1, budget))
                    .collect::<std::result::Result<_, _>>()?,
            ),
            Obj::Dict(items) => {
                let mut map = serde_json::Map::new();
                for &(k, v) in items {
                    let key = match self.get(k) {
                        Obj::Str(s) => s.clone(),
                        Obj::Int(i) => i.to_string(),
                        Obj::Bool(b) => if *b { "True" } else { "False" }.to_string(),
                        Obj::None => "None".to_string(),
                        _ => return Err(format!("a dict key is {}", self.kind(k))),
                    };
                    let value = self.json(v, depth + 1, budget)?;
                    map.insert(key, value);
                }
                Json::Object(map)
            }
            Obj::Global(Global::Dtype(d)) => Json::from(format!("torch.{}", d.name())),
            Obj::Object {
                class: Global::TlConfig,
                state: Some(state),
            } => {
                // A dataclass pickles its `__dict__`; with `__slots__` the state is a pair
                // `(dict, slots)`.
                let state = match self.get(*state) {
                    Obj::Tuple(pair) if pair.len() == 2 => pair[0],
                    _ => *state,
                };
                match self.get(state) {
                    Obj::Dict(_) => self.json(state, depth + 1, budget)?,
                    _ => {
                        return Err(format!(
                            "the HookedTransformerConfig object's state is {}, expected a dict",
                            self.kind(state)
                        ))
                    }
                }
            }
            Obj::Object { state: None, .. } => {
                return Err("an object without state (no BUILD)".into())
            }
            other => {
                let what = match other {
                    Obj::Tensor(_) => "a tensor",
                    Obj::Storage(_) => "a storage",
                    Obj::Bytes(_) => "bytes",
                    _ => "a class or function",
                };
                return Err(format!("{what} where plain data was expected"));
            }
        })
    }

    /// The `name → tensor` pairs of a state dict: the root must be a dict (an `OrderedDict`)
    /// of string keys and tensors.
    pub fn state_dict(&self, path: &Path) -> Result<Vec<(String, TensorRef)>> {
        let bad = |message: String| Error::Pth {
            path: path.to_path_buf(),
            message,
        };
        let Obj::Dict(items) = self.get(self.root) else {
            return Err(bad(format!(
                "the pickle holds {}, expected a state dict (a dict of tensor names to tensors; \
                 save `model.state_dict()`, not the model)",
                self.kind(self.root)
            )));
        };
        let mut out = Vec::with_capacity(items.len());
        for &(k, v) in items {
            let name = self
                .str(k)
                .ok_or_else(|| bad(format!("a state-dict key is {}", self.kind(k))))?;
            match self.get(v) {
                Obj::Tensor(t) => out.push((name.to_string(), t.clone())),
                _ => {
                    return Err(bad(format!(
                        "state-dict entry `{name}` is {}, expected a tensor",
                        self.kind(v)
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// The interpreter's state while it runs.
struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    objs: Vec<Obj>,
    stack: Vec<Id>,
    /// Stack lengths at each `MARK`.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    /// Per dict, key → position in its items (built on the dict's first SETITEM).
    dict_keys: HashMap<Id, HashMap<Key, usize>>,
}

/// A dict key eap can compare.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Str(String),
    Int(i64),
    None,
}

impl<'a> Machine<'a> {
    fn err(&self, offset: usize, message: impl Into<String>) -> Error {
        Error::Pickle {
            path: PathBuf::from(self.path),
            offset,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize, at: usize, what: &str) -> Result<&'a [u8]> {
        let left = self.bytes.len() - self.pos;
        if n > left {
            return Err(self.err(
                at,
                format!("{what} needs {n} bytes but only {left} remain (truncated?)"),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, at: usize) -> Result<u8> {
        Ok(self.take(1, at, "an argument")?[0])
    }

    fn u16(&mut self, at: usize) -> Result<u16> {
        let b = self.take(2, at, "an argument")?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, at: usize) -> Result<u32> {
        let b = self.take(4, at, "an argument")?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, at: usize) -> Result<u64> {
        let b = self.take(8, at, "an argument")?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A length field, checked against the bytes that remain before anything is allocated.
    fn len(&mut self, n: u64, at: usize, what: &str) -> Result<&'a [u8]> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(self.err(
                at,
                format!(
                    "{what} claims {n} bytes but only {left} remain (a lying length or a \
                     truncated file)"
                ),
            ));
        }
        self.take(n as usize, at, what)
    }

    /// A newline-terminated line (the text arguments of `GLOBAL`), at most 256 bytes.
    fn line(&mut self, at: usize) -> Result<String> {
        let rest = &self.bytes[self.pos..];
        let end = rest
            .iter()
            .take(256)
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err(at, "unterminated text argument (truncated?)"))?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| self.err(at, "text argument is not UTF-8"))?
            .to_string();
        self.pos += end + 1;
        Ok(s)
    }

    fn utf8(&self, b: &[u8], at: usize) -> Result<String> {
        String::from_utf8(b.to_vec()).map_err(|_| self.err(at, "string is not valid UTF-8"))
    }

    fn alloc(&mut self, obj: Obj) -> Id {
        self.objs.push(obj);
        self.objs.len() - 1
    }

    fn push(&mut self, obj: Obj) {
        let id = self.alloc(obj);
        self.stack.push(id);
    }

    fn pop(&mut self, at: usize, op: &str) -> Result<Id> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(at, format!("{op} on an empty stack")));
        }
        Ok(self.stack.pop().expect("non-empty"))
    }

    fn top(&self, at: usize, op: &str) -> Result<Id> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(at, format!("{op} on an empty stack")));
        }
        Ok(*self.stack.last().expect("non-empty"))
    }

    /// The items pushed since the last `MARK`, which is removed.
    fn pop_mark(&mut self, at: usize, op: &str) -> Result<Vec<Id>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.err(at, format!("{op} without a MARK")))?;
        Ok(self.stack.split_off(mark))
    }

    fn int(&self, id: Id, at: usize, what: &str) -> Result<i64> {
        match &self.objs[id] {
            Obj::Int(i) => Ok(*i),
            Obj::Bool(b) => Ok(*b as i64),
            _ => Err(self.err(at, format!("{what} must be an int"))),
        }
    }

    fn usize_list(&self, id: Id, at: usize, what: &str) -> Result<Vec<usize>> {
        let items = match &self.objs[id] {
            Obj::Tuple(v) | Obj::List(v) => v.clone(),
            _ => return Err(self.err(at, format!("{what} must be a tuple of ints"))),
        };
        items
            .iter()
            .map(|&i| {
                let v = self.int(i, at, what)?;
                usize::try_from(v)
                    .map_err(|_| self.err(at, format!("{what} holds the negative value {v}")))
            })
            .collect()
    }

    fn run(mut self) -> Result<Pickle> {
        loop {
            let at = self.pos;
            let Some(&op) = self.bytes.get(self.pos) else {
                return Err(self.err(at, "the pickle ends before its STOP opcode (truncated?)"));
            };
            self.pos += 1;
            match op {
                // PROTO
                0x80 => {
                    let v = self.u8(at)?;
                    if v > 5 {
                        return Err(self.err(at, format!("pickle protocol {v} (eap reads 2–5)")));
                    }
                }
                // FRAME: advisory framing; its length is checked, the contents read as usual.
                0x95 => {
                    let n = self.u64(at)?;
                    let left = (self.bytes.len() - self.pos) as u64;
                    if n > left {
                        return Err(self.err(
                            at,
                            format!("FRAME claims {n} bytes but only {left} remain (truncated?)"),
                        ));
                    }
                }
                b'.' => {
                    let root = self.pop(at, "STOP")?;
                    return Ok(Pickle {
                        objs: self.objs,
                        root,
                    });
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop(at, "POP")?;
                }
                b'1' => {
                    self.pop_mark(at, "POP_MARK")?;
                }
                b'2' => {
                    let top = self.top(at, "DUP")?;
                    self.stack.push(top);
                }
                b'N' => self.push(Obj::None),
                0x88 => self.push(Obj::Bool(true)),
                0x89 => self.push(Obj::Bool(false)),
                b'J' => {
                    let v = self.u32(at)? as i32;
                    self.push(Obj::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8(at)?;
                    self.push(Obj::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16(at)?;
                    self.push(Obj::Int(v as i64));
                }
                // LONG1, LONG4: little-endian two's complement of n bytes.
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8(at)? as u64
                    } else {
                        self.u32(at)? as u64
                    };
                    let b = self.len(n, at, "LONG")?;
                    if b.len() > 8 {
                        return Err(self.err(at, "integer wider than 64 bits"));
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..b.len()].copy_from_slice(b);
                    self.push(Obj::Int(i64::from_le_bytes(buf)));
                }
                // INT (text): protocol 0/1, but `I01\n`/`I00\n` are also how old picklers
                // spell True/False.
                b'I' => {
                    let s = self.line(at)?;
                    let obj = match s.as_str() {
                        "01" => Obj::Bool(true),
                        "00" => Obj::Bool(false),
                        _ => Obj::Int(
                            s.parse()
                                .map_err(|_| self.err(at, format!("INT argument {s:?}")))?,
                        ),
                    };
                    self.push(obj);
                }
                b'G' => {
                    let b = self.take(8, at, "BINFLOAT")?;
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.push(Obj::Float(v));
                }
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32(at)? as u64,
                        0x8c => self.u8(at)? as u64,
                        _ => self.u64(at)?,
                    };
                    let b = self.len(n, at, "a string")?;
                    let s = self.utf8(b, at)?;
                    self.push(Obj::Str(s));
                }
                // SHORT_BINSTRING, BINSTRING (Python 2 str): read as text when it is UTF-8.
                b'U' | b'T' => {
                    let n = if op == b'U' {
                        self.u8(at)? as u64
                    } else {
                        self.u32(at)? as u64
                    };
                    let b = self.len(n, at, "a string")?;
                    let s = self.utf8(b, at)?;
                    self.push(Obj::Str(s));
                }
                // SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
                b'C' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => self.u8(at)? as u64,
                        b'B' => self.u32(at)? as u64,
                        _ => self.u64(at)?,
                    };
                    let b = self.len(n, at, "bytes")?.to_vec();
                    self.push(Obj::Bytes(b));
                }
                b')' => self.push(Obj::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark(at, "TUPLE")?;
                    self.push(Obj::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(at, "TUPLE1/2/3")?);
                    }
                    items.reverse();
                    self.push(Obj::Tuple(items));
                }
                b']' => self.push(Obj::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark(at, "LIST")?;
                    self.push(Obj::List(items));
                }
                b'a' => {
                    let v = self.pop(at, "APPEND")?;
                    let list = self.top(at, "APPEND")?;
                    self.extend(list, vec![v], at, "APPEND")?;
                }
                b'e' => {
                    let items = self.pop_mark(at, "APPENDS")?;
                    let list = self.top(at, "APPENDS")?;
                    self.extend(list, items, at, "APPENDS")?;
                }
                // EMPTY_SET, ADDITEMS, FROZENSET: sets are read as lists.
                0x8f => self.push(Obj::List(Vec::new())),
                0x90 => {
                    let items = self.pop_mark(at, "ADDITEMS")?;
                    let set = self.top(at, "ADDITEMS")?;
                    self.extend(set, items, at, "ADDITEMS")?;
                }
                0x91 => {
                    let items = self.pop_mark(at, "FROZENSET")?;
                    self.push(Obj::List(items));
                }
                b'}' => self.push(Obj::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark(at, "DICT")?;
                    let pairs = self.pairs(items, at, "DICT")?;
                    self.push(Obj::Dict(pairs));
                }
                b's' => {
                    let v = self.pop(at, "SETITEM")?;
                    let k = self.pop(at, "SETITEM")?;
                    let dict = self.top(at, "SETITEM")?;
                    self.set_items(dict, vec![(k, v)], at)?;
                }
                b'u' => {
                    let items = self.pop_mark(at, "SETITEMS")?;
                    let pairs = self.pairs(items, at, "SETITEMS")?;
                    let dict = self.top(at, "SETITEMS")?;
                    self.set_items(dict, pairs, at)?;
                }
                // BINPUT, LONG_BINPUT, MEMOIZE
                b'q' | b'r' | 0x94 => {
                    let key = match op {
                        b'q' => self.u8(at)? as u32,
                        b'r' => self.u32(at)?,
                        _ => self.memo.len() as u32,
                    };
                    let top = self.top(at, "PUT")?;
                    self.memo.insert(key, top);
                }
                // BINGET, LONG_BINGET
                b'h' | b'j' => {
                    let key = if op == b'h' {
                        self.u8(at)? as u32
                    } else {
                        self.u32(at)?
                    };
                    let id = *self.memo.get(&key).ok_or_else(|| {
                        self.err(at, format!("GET of memo entry {key}, never PUT"))
                    })?;
                    self.stack.push(id);
                }
                b'c' => {
                    let module = self.line(at)?;
                    let name = self.line(at)?;
                    let g = self.global(&module, &name, at, "GLOBAL")?;
                    self.push(Obj::Global(g));
                }
                0x93 => {
                    let name = self.pop(at, "STACK_GLOBAL")?;
                    let module = self.pop(at, "STACK_GLOBAL")?;
                    let (Some(module), Some(name)) = (
                        self.str_of(module).map(str::to_string),
                        self.str_of(name).map(str::to_string),
                    ) else {
                        return Err(self.err(at, "STACK_GLOBAL of non-string names"));
                    };
                    let g = self.global(&module, &name, at, "STACK_GLOBAL")?;
                    self.push(Obj::Global(g));
                }
                b'R' => {
                    let args = self.pop(at, "REDUCE")?;
                    let callable = self.pop(at, "REDUCE")?;
                    let obj = self.call(callable, args, at)?;
                    self.stack.push(obj);
                }
                // NEWOBJ, NEWOBJ_EX: `cls.__new__(cls, *args)`.
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop(at, "NEWOBJ_EX")?; // kwargs
                    }
                    self.pop(at, "NEWOBJ")?; // args
                    let cls = self.pop(at, "NEWOBJ")?;
                    let obj = match self.objs[cls] {
                        Obj::Global(Global::TlConfig) => Obj::Object {
                            class: Global::TlConfig,
                            state: None,
                        },
                        Obj::Global(Global::OrderedDict) => Obj::Dict(Vec::new()),
                        Obj::Global(Global::Set) => Obj::List(Vec::new()),
                        _ => {
                            return Err(self.err(
                                at,
                                format!(
                                    "NEWOBJ of {}: only the TransformerLens config class and \
                                     OrderedDict are instantiated",
                                    self.describe(cls)
                                ),
                            ))
                        }
                    };
                    self.push(obj);
                }
                b'b' => {
                    let state = self.pop(at, "BUILD")?;
                    let target = self.top(at, "BUILD")?;
                    match &mut self.objs[target] {
                        Obj::Object { state: s, .. } => *s = Some(state),
                        // An OrderedDict's instance attributes (a state dict's `_metadata`) and
                        // a tensor's Python attributes are not part of the data.
                        Obj::Dict(_) | Obj::Tensor(_) => {}
                        _ => {
                            return Err(self.err(at, format!("BUILD of {}", self.describe(target))))
                        }
                    }
                }
                // BINPERSID: PyTorch's storage references.
                b'Q' => {
                    let pid = self.pop(at, "BINPERSID")?;
                    let storage = self.storage(pid, at)?;
                    self.push(Obj::Storage(storage));
                }
                _ => return Err(self.err(at, format!("{} is not read by eap", opcode_name(op)))),
            }
        }
    }

    fn str_of(&self, id: Id) -> Option<&str> {
        match &self.objs[id] {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }

    fn describe(&self, id: Id) -> String {
        match &self.objs[id] {
            Obj::Global(g) => format!("`{}`", g.python_name()),
            Obj::None => "None".into(),
            Obj::Int(i) => format!("the int {i}"),
            Obj::Str(s) => format!("the string {:?}", s.chars().take(40).collect::<String>()),
            Obj::List(_) => "a list".into(),
            Obj::Tuple(_) => "a tuple".into(),
            Obj::Dict(_) => "a dict".into(),
            Obj::Storage(_) => "a storage".into(),
            Obj::Tensor(_) => "a tensor".into(),
            Obj::Object { .. } => "an object".into(),
            Obj::Bool(_) | Obj::Float(_) | Obj::Bytes(_) => "a scalar".into(),
        }
    }

    fn global(&self, module: &str, name: &str, at: usize, op: &str) -> Result<Global> {
        resolve_global(module, name).ok_or_else(|| {
            self.err(
                at,
                format!(
                    "{op} `{module}.{name}` is not on eap's allow-list (torch's tensor-rebuild \
                     functions and storage types, collections.OrderedDict, torch dtypes, the \
                     TransformerLens config class); eap never imports or runs what a pickle \
                     names, so this file is not a plain state dict, config or edge list"
                ),
            )
        })
    }

    fn extend(&mut self, target: Id, items: Vec<Id>, at: usize, op: &str) -> Result<()> {
        match &mut self.objs[target] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            _ => Err(self.err(at, format!("{op} to {}", self.describe(target)))),
        }
    }

    fn pairs(&self, items: Vec<Id>, at: usize, op: &str) -> Result<Vec<(Id, Id)>> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err(at, format!("{op} with an odd number of items")));
        }
        Ok(items.chunks(2).map(|c| (c[0], c[1])).collect())
    }

    fn set_items(&mut self, dict: Id, pairs: Vec<(Id, Id)>, at: usize) -> Result<()> {
        if !matches!(self.objs[dict], Obj::Dict(_)) {
            return Err(self.err(at, format!("SETITEM(S) on {}", self.describe(dict))));
        }
        // Python semantics: a repeated key replaces the value in place. Each dict's key index
        // is built once and kept, so a file of many single SETITEMs stays linear.
        if !self.dict_keys.contains_key(&dict) {
            let Obj::Dict(items) = &self.objs[dict] else {
                unreachable!("checked above")
            };
            let index = items
                .iter()
                .enumerate()
                .filter_map(|(i, &(k, _))| self.key(k).map(|k| (k, i)))
                .collect();
            self.dict_keys.insert(dict, index);
        }
        let keys: Vec<Option<Key>> = pairs.iter().map(|&(k, _)| self.key(k)).collect();
        let index = self.dict_keys.get_mut(&dict).expect("inserted above");
        let Obj::Dict(items) = &mut self.objs[dict] else {
            unreachable!("checked above")
        };
        for ((k, v), key) in pairs.into_iter().zip(keys) {
            match key {
                Some(key) => match index.get(&key) {
                    Some(&i) => items[i] = (k, v),
                    None => {
                        index.insert(key, items.len());
                        items.push((k, v));
                    }
                },
                None => items.push((k, v)),
            }
        }
        Ok(())
    }

    /// A hashable key's value (strings, ints, bools, None), for replacing repeated dict keys.
    fn key(&self, id: Id) -> Option<Key> {
        match &self.objs[id] {
            Obj::Str(s) => Some(Key::Str(s.clone())),
            Obj::Int(i) => Some(Key::Int(*i)),
            // Python: True == 1 and False == 0 as dict keys.
            Obj::Bool(b) => Some(Key::Int(*b as i64)),
            Obj::None => Some(Key::None),
            _ => None,
        }
    }

    /// `REDUCE`: the value an allowed callable would return, built without calling anything.
    fn call(&mut self, callable: Id, args: Id, at: usize) -> Result<Id> {
        let Obj::Tuple(args) = self.objs[args].clone() else {
            return Err(self.err(at, "REDUCE arguments must be a tuple"));
        };
        let g = match self.objs[callable] {
            Obj::Global(g) => g,
            _ => {
                return Err(self.err(
                    at,
                    format!(
                        "REDUCE calls {}, which is not callable",
                        self.describe(callable)
                    ),
                ))
            }
        };
        match g {
            Global::RebuildTensor => {
                if !(6..=7).contains(&args.len()) {
                    return Err(self.err(
                        at,
                        format!(
                            "_rebuild_tensor_v2 with {} arguments, expected 6",
                            args.len()
                        ),
                    ));
                }
                let storage = match &self.objs[args[0]] {
                    Obj::Storage(s) => s.clone(),
                    _ => return Err(self.err(at, "_rebuild_tensor_v2 of something not a storage")),
                };
                let offset = self.int(args[1], at, "a tensor's storage offset")?;
                let offset = u64::try_from(offset)
                    .map_err(|_| self.err(at, format!("negative storage offset {offset}")))?;
                let shape = self.usize_list(args[2], at, "a tensor's size")?;
                let strides = self.usize_list(args[3], at, "a tensor's stride")?;
                if shape.len() != strides.len() {
                    return Err(self.err(
                        at,
                        format!(
                            "a tensor has {} sizes but {} strides",
                            shape.len(),
                            strides.len()
                        ),
                    ));
                }
                Ok(self.alloc(Obj::Tensor(TensorRef {
                    storage,
                    offset,
                    shape,
                    strides,
                })))
            }
            Global::RebuildParameter => match args.first().map(|&a| &self.objs[a]) {
                Some(Obj::Tensor(_)) => Ok(args[0]),
                _ => Err(self.err(at, "_rebuild_parameter of something not a tensor")),
            },
            Global::OrderedDict => {
                let mut pairs = Vec::new();
                if let Some(&items) = args.first() {
                    let Some(items) = self.items_of(items) else {
                        return Err(self.err(at, "OrderedDict of something not a list of pairs"));
                    };
                    for item in items {
                        match self.items_of(item).as_deref() {
                            Some([k, v]) => pairs.push((*k, *v)),
                            _ => return Err(self.err(at, "OrderedDict item is not a pair")),
                        }
                    }
                }
                Ok(self.alloc(Obj::Dict(pairs)))
            }
            Global::Set => {
                let items = match args.first() {
                    Some(&a) => self
                        .items_of(a)
                        .ok_or_else(|| self.err(at, "set of something not a list"))?,
                    None => Vec::new(),
                };
                Ok(self.alloc(Obj::List(items)))
            }
            Global::Device => match args.first().and_then(|&a| self.str_of(a)) {
                Some(s) => {
                    let s = s.to_string();
                    Ok(self.alloc(Obj::Str(s)))
                }
                None => Err(self.err(at, "torch.device of something not a string")),
            },
            Global::Storage(_) | Global::Dtype(_) | Global::TlConfig => Err(self.err(
                at,
                format!(
                    "REDUCE calls `{}`, which eap reads only as a name, never calls",
                    g.python_name()
                ),
            )),
        }
    }

    fn items_of(&self, id: Id) -> Option<Vec<Id>> {
        match &self.objs[id] {
            Obj::List(v) | Obj::Tuple(v) => Some(v.clone()),
            _ => None,
        }
    }

    /// `('storage', torch.FloatStorage, key, location, numel)`.
    fn storage(&self, pid: Id, at: usize) -> Result<StorageRef> {
        let bad = |why: &str| {
            self.err(
                at,
                format!(
                    "persistent id {why}; expected ('storage', <storage type>, key, location, \
                     numel) as torch.save writes"
                ),
            )
        };
        let Some(items) = self.items_of(pid) else {
            return Err(bad("is not a tuple"));
        };
        if items.len() != 5 || self.str_of(items[0]) != Some("storage") {
            return Err(bad("has the wrong form"));
        }
        let dtype = match self.objs[items[1]] {
            Obj::Global(Global::Storage(d)) => d,
            _ => return Err(bad("names no storage type")),
        };
        let key = self
            .str_of(items[2])
            .ok_or_else(|| bad("has a non-string key"))?
            .to_string();
        let numel = self.int(items[4], at, "a storage's element count")?;
        let numel = u64::try_from(numel).map_err(|_| bad("has a negative element count"))?;
        Ok(StorageRef { dtype, key, numel })
    }
}

/// An opcode's name in Python's `pickletools`, for error messages.
fn opcode_name(op: u8) -> String {
    let name = match op {
        b'i' => "INST",
        b'o' => "OBJ",
        b'P' => "PERSID",
        b'p' => "PUT",
        b'g' => "GET",
        b'F' => "FLOAT",
        b'L' => "LONG",
        b'S' => "STRING",
        b'V' => "UNICODE",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return format!("unknown opcode 0x{op:02x}"),
    };
    format!("opcode {name} (0x{op:02x})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> Result<Pickle> {
        Pickle::parse(b, Path::new("t.pkl"))
    }

    #[test]
    fn plain_data_protocol_4() {
        // pickle.dumps({'a': [1, 2.5, None, True], 'b': ('x', -3)}, protocol=4)
        let b = b"\x80\x04\x95)\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]\x94(K\x01G@\x04\x00\x00\x00\x00\x00\x00N\x88e\x8c\x01b\x94\x8c\x01x\x94J\xfd\xff\xff\xff\x86\x94u.";
        let p = parse(b).unwrap();
        let j = p.to_json(p.root()).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"a": [1, 2.5, null, true], "b": ["x", -3]})
        );
    }

    #[test]
    fn globals_outside_the_allow_list_are_refused_with_offset() {
        // pickle.dumps of an object whose __reduce__ returns (os.system, ('echo',)), protocol 2.
        let b = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00echoq\x01\x85q\x02Rq\x03.";
        let e = parse(b).unwrap_err().to_string();
        assert!(e.contains("byte 2") && e.contains("posix.system"), "{e}");
        // The same through STACK_GLOBAL (protocol 4).
        let b = b"\x80\x04\x8c\x02os\x8c\x06system\x93.";
        let e = parse(b).unwrap_err().to_string();
        assert!(e.contains("STACK_GLOBAL `os.system`"), "{e}");
    }

    #[test]
    fn lying_lengths_and_truncation_are_errors() {
        let e = parse(b"\x80\x04X\xff\xff\xff\x7fab")
            .unwrap_err()
            .to_string();
        assert!(e.contains("claims 2147483647 bytes"), "{e}");
        let e = parse(b"\x80\x04K\x01").unwrap_err().to_string();
        assert!(e.contains("before its STOP"), "{e}");
        let e = parse(b"\x80\x04\xfe.").unwrap_err().to_string();
        assert!(e.contains("unknown opcode 0xfe"), "{e}");
    }

    #[test]
    fn repeated_dict_keys_replace_in_place() {
        // EMPTY_DICT, then SETITEM 'a'=1, 'b'=2, 'a'=3 one at a time: {'a': 3, 'b': 2}.
        let b = b"\x80\x04}\x8c\x01aK\x01s\x8c\x01bK\x02s\x8c\x01aK\x03s.";
        let p = parse(b).unwrap();
        assert_eq!(
            p.to_json(p.root()).unwrap(),
            serde_json::json!({"a": 3, "b": 2})
        );
        let Obj::Dict(items) = p.get(p.root()) else {
            panic!("a dict")
        };
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn many_single_setitems_stay_linear() {
        // 100,000 one-at-a-time SETITEMs (int keys): linear work, not one index per SETITEM.
        let mut b = b"\x80\x04}".to_vec();
        for i in 0..100_000u32 {
            b.push(b'J');
            b.extend_from_slice(&i.to_le_bytes());
            b.extend_from_slice(b"Ns");
        }
        b.push(b'.');
        let start = std::time::Instant::now();
        let p = parse(&b).unwrap();
        assert!(matches!(p.get(p.root()), Obj::Dict(v) if v.len() == 100_000));
        assert!(start.elapsed().as_secs_f64() < 5.0, "{:?}", start.elapsed());
    }

    #[test]
    fn self_reference_stops_json_conversion() {
        // l = []; l.append(l); pickle.dumps(l, 4)
        let b = b"\x80\x04\x95\x06\x00\x00\x00\x00\x00\x00\x00]\x94h\x00a.";
        let p = parse(b).unwrap();
        let e = p.to_json(p.root()).unwrap_err();
        assert!(e.contains("deeper"), "{e}");
    }
}
