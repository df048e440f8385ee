//! Integration tests, one themed module each; helpers in `util`.

mod errors;
mod model;
mod util;
