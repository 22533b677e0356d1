//! integration support code.
