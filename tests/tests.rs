//! Integration tests, one themed module each; helpers in `util`.

mod model;
mod util;
