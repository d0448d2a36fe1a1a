//! What the virtio devices share: finding a device in the virtio-mmio
//! slots (`discover`) and the DMA memory virtio-drivers asks the platform
//! for (`hal`).

pub mod discover;
pub mod hal;
