//! Pipeline cut (in progress).
