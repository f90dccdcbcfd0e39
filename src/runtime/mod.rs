//! What a run stands on besides the model: the compute device and threads, memory (the budget
//! and its meter), the machine's hardware, stop signals, and the starting configurations per
//! machine size.

pub mod device;
pub mod hardware;
pub mod memory;
pub mod presets;
pub mod setup_file;
pub mod signals;
