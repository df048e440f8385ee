//! Integration tests, one themed module each.
