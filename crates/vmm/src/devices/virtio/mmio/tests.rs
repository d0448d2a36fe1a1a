use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use crate::memory::GuestRam;

/// A device that records what the transport did to it.
#[derive(Default)]
struct Probe {
    activations: Arc<AtomicU32>,
    resets: Arc<AtomicU32>,
    queues: Option<Vec<QueueState>>,
}

impl VirtioDevice for Probe {
    type State = u8;
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[64, 64]
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, a: Activation) -> Result<(), super::super::ActivateError> {
        self.activations.fetch_add(1, Ordering::SeqCst);
        assert_eq!(a.notifiers.len(), 2);
        self.queues = Some(a.queues.iter().map(|q| q.state()).collect());
        Ok(())
    }
    fn reset(&mut self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.queues = None;
    }
    fn pause(&mut self) {}
    fn resume(&mut self) {}
    fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.queues.clone()
    }
    fn save(&self) -> u8 {
        7
    }
}

fn read(t: &MmioTransport<Probe>, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.mmio_read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn write(t: &MmioTransport<Probe>, offset: u64, v: u32) {
    t.mmio_write(offset, &v.to_le_bytes());
}

/// What a driver does: acknowledge, negotiate, set up both queues, go.
fn bring_up(t: &MmioTransport<Probe>, acked_high: u32) -> u32 {
    write(t, reg::STATUS, 0);
    write(t, reg::STATUS, status::ACKNOWLEDGE);
    write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write(t, reg::DRIVER_FEATURES_SEL, 1);
    write(t, reg::DRIVER_FEATURES, acked_high);
    write(t, reg::DRIVER_FEATURES_SEL, 0);
    write(t, reg::DRIVER_FEATURES, 1);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write(t, reg::STATUS, s);
    let s = read(t, reg::STATUS);
    for q in 0..2u32 {
        write(t, reg::QUEUE_SEL, q);
        assert_eq!(read(t, reg::QUEUE_READY), 0);
        assert_eq!(read(t, reg::QUEUE_NUM_MAX), 64);
        write(t, reg::QUEUE_NUM, 64);
        let base = 0x10_000 + u32::from(q as u16) * 0x4000;
        write(t, reg::QUEUE_DESC_LOW, base);
        write(t, reg::QUEUE_DRIVER_LOW, base + 0x1000);
        write(t, reg::QUEUE_DEVICE_LOW, base + 0x2000);
        write(t, reg::QUEUE_READY, 1);
    }
    write(t, reg::STATUS, s | status::DRIVER_OK);
    read(t, reg::STATUS)
}

#[test]
fn identifies_itself_as_a_modern_virtio_mmio_device() {
    let ram = GuestRam::new(2 << 20, false).unwrap();
    let t = MmioTransport::new(Probe::default(), ram.memory().clone()).unwrap();
    assert_eq!(read(&t, reg::MAGIC), 0x7472_6976);
    assert_eq!(read(&t, reg::VERSION), 2);
    assert_eq!(read(&t, reg::DEVICE_ID), 42);
    write(&t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(read(&t, reg::DEVICE_FEATURES), 1);
    write(&t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(read(&t, reg::DEVICE_FEATURES), 1);
    let mut cfg = [0u8; 2];
    t.mmio_read(reg::CONFIG + 6, &mut cfg);
    assert_eq!(cfg, [6, 6]);
}

#[test]
fn driver_ok_activates_and_status_zero_resets() {
    let ram = GuestRam::new(2 << 20, false).unwrap();
    let probe = Probe::default();
    let (acts, resets) = (probe.activations.clone(), probe.resets.clone());
    let t = MmioTransport::new(probe, ram.memory().clone()).unwrap();
    let s = bring_up(&t, 1);
    assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK, "{s:#x}");
    assert_eq!(acts.load(Ordering::SeqCst), 1);
    // Queue registers are frozen while running.
    write(&t, reg::QUEUE_SEL, 0);
    write(&t, reg::QUEUE_NUM, 8);
    let (state, dev) = t.save();
    assert_eq!(dev, 7);
    assert_eq!(state.queues[0].size, 64);
    assert_eq!(state.queues[1].desc_table, 0x14_000);
    assert_eq!(state.acked_features, features::VERSION_1 | 1);

    let probe = Probe::default();
    let acts2 = probe.activations.clone();
    let back = MmioTransport::restore(probe, ram.memory().clone(), &state).unwrap();
    assert_eq!(acts2.load(Ordering::SeqCst), 1, "restore re-activates");
    assert_eq!(back.save().0, state);

    write(&t, reg::STATUS, 0);
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    assert_eq!(read(&t, reg::STATUS), 0);
    write(&t, reg::QUEUE_SEL, 0);
    assert_eq!(read(&t, reg::QUEUE_READY), 0);
}

#[test]
fn features_without_version_1_are_refused() {
    let ram = GuestRam::new(2 << 20, false).unwrap();
    let probe = Probe::default();
    let acts = probe.activations.clone();
    let t = MmioTransport::new(probe, ram.memory().clone()).unwrap();
    let s = bring_up(&t, 0);
    assert_eq!(s & status::FEATURES_OK, 0);
    assert_ne!(s & status::FAILED, 0);
    assert_eq!(acts.load(Ordering::SeqCst), 0);
}

#[test]
fn queues_outside_memory_need_a_reset() {
    let ram = GuestRam::new(2 << 20, false).unwrap();
    let t = MmioTransport::new(Probe::default(), ram.memory().clone()).unwrap();
    write(&t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write(&t, reg::DRIVER_FEATURES_SEL, 1);
    write(&t, reg::DRIVER_FEATURES, 1);
    write(
        &t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    write(&t, reg::QUEUE_SEL, 0);
    write(&t, reg::QUEUE_NUM, 64);
    write(&t, reg::QUEUE_DESC_LOW, 0x7000_0000);
    write(&t, reg::QUEUE_DRIVER_LOW, 0x1000);
    write(&t, reg::QUEUE_DEVICE_LOW, 0x2000);
    write(&t, reg::QUEUE_READY, 1);
    write(
        &t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert_ne!(read(&t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    write(&t, reg::STATUS, 0);
    assert_eq!(read(&t, reg::STATUS), 0, "a reset clears NEEDS_RESET");
}

#[test]
fn a_notify_write_without_ioeventfd_reaches_the_queue_eventfd() {
    let ram = GuestRam::new(2 << 20, false).unwrap();
    let t = MmioTransport::new(Probe::default(), ram.memory().clone()).unwrap();
    write(&t, reg::QUEUE_NOTIFY, 1);
    let fds: Vec<_> = t.notifiers().collect();
    assert_eq!(fds[1].0, 0x50);
    assert_eq!(fds[1].2.read().unwrap(), 1);
    assert!(fds[0].2.read().is_err(), "queue 0 was not notified");
}
