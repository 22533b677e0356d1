//! Where volume bytes live: the `Storage` trait and its backends.
