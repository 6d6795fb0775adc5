//! vdi
