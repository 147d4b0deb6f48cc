//! Device models behind one bus trait.
