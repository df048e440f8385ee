//! Integration tests, one themed module each; helpers in `util`.

mod attribution;
mod model;
mod util;
