//! Integration tests, one themed module each; helpers in `util`.

mod acdc;
mod attribution;
mod cli;
mod errors;
mod families;
mod formats;
mod fuzz;
mod interpbench;
mod layout;
mod loading;
mod mib;
mod model;
mod output;
mod scale;
mod util;
