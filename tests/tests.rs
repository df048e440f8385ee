//! Integration tests, one themed module each; helpers in `util`.

mod attribution;
mod formats;
mod model;
mod util;
