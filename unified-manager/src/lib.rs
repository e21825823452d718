//! unified-manager
