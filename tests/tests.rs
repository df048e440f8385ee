//! Integration tests, one themed module each; helpers in `util`.

mod acdc;
mod attribution;
mod cli;
mod errors;
mod formats;
mod layout;
mod model;
mod util;
