//! ZeRO-style distribution (in progress).
