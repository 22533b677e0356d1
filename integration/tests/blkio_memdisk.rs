//! The vhost-user-blk side alone: libblkio against the backend served in-process over an
//! in-memory disk (no engine, no keys), so virtio problems show up apart from volume ones.

use blkio::Errno;
use integration::client::{describe, BlkioClient};
use integration::inproc::InProcessServer;
use integration::pattern;

const MIB: u64 = 1 << 20;

fn connect(server: &InProcessServer, queues: usize, read_only: bool) -> BlkioClient {
    BlkioClient::connect(&server.socket, queues, read_only, 4 << 20)
        .unwrap_or_else(|e| panic!("connect: {}", describe(&e)))
}

#[test]
fn advertises_capacity_and_limits() {
    let server = InProcessServer::start(64 * MIB, 2, false);
    let client = connect(&server, 2, false);
    assert_eq!(client.capacity().unwrap(), 64 * MIB);
    assert_eq!(client.property_u64("max-discard-len").unwrap(), 1 << 30);
    assert_eq!(
        client.property_u64("max-write-zeroes-len").unwrap(),
        1 << 30
    );
    assert_eq!(client.num_queues(), 2);
}

#[test]
fn writes_read_back_and_land_on_the_disk() {
    let server = InProcessServer::start(64 * MIB, 1, false);
    let mut client = connect(&server, 1, false);
    for (offset, len) in [
        (0u64, 4096usize),
        (512, 512),
        (MIB, 1 << 20),
        (63 * MIB, 8192),
    ] {
        let data = pattern::make(len, offset, 1);
        client.write(offset, &data).unwrap();
        assert_eq!(client.read(offset, len).unwrap(), data, "at {offset}");
        let disk = server.disk.contents();
        assert_eq!(&disk[offset as usize..offset as usize + len], &data[..]);
    }
    client.flush().unwrap();
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let server = InProcessServer::start(16 * MIB, 1, false);
    let mut client = connect(&server, 1, false);
    client.write(0, &pattern::make(1 << 20, 0, 2)).unwrap();
    client.discard(0, 64 * 1024).unwrap();
    client.write_zeroes(128 * 1024, 64 * 1024, true).unwrap();
    client.write_zeroes(256 * 1024, 4096, false).unwrap();
    let data = client.read(0, 1 << 20).unwrap();
    assert!(data[..64 * 1024].iter().all(|&b| b == 0));
    assert!(data[128 * 1024..192 * 1024].iter().all(|&b| b == 0));
    assert!(data[256 * 1024..260 * 1024].iter().all(|&b| b == 0));
    assert_eq!(
        &data[64 * 1024..128 * 1024],
        &pattern::make(1 << 20, 0, 2)[64 * 1024..128 * 1024]
    );
}

#[test]
fn out_of_range_requests_fail_and_serving_goes_on() {
    let server = InProcessServer::start(4 * MIB, 1, false);
    let mut client = connect(&server, 1, false);
    assert_eq!(client.read(4 * MIB, 4096), Err(Errno::IO));
    assert_eq!(client.read(4 * MIB - 512, 1024), Err(Errno::IO));
    assert_eq!(client.write(4 * MIB, &[1; 512]), Err(Errno::IO));
    assert_eq!(client.discard(4 * MIB - 4096, 8192), Err(Errno::IO));
    assert_eq!(client.write_zeroes(8 * MIB, 4096, true), Err(Errno::IO));
    client.write(0, &[7; 4096]).unwrap();
    assert_eq!(client.read(0, 4096).unwrap(), vec![7; 4096]);
}

#[test]
fn read_only_device_refuses_writes() {
    let server = InProcessServer::start(4 * MIB, 1, true);
    // libblkio itself refuses to start a writable session on an RO device.
    let err = BlkioClient::connect(&server.socket, 1, false, 1 << 20).unwrap_err();
    assert_eq!(err.errno(), Errno::ROFS, "{}", describe(&err));
    let mut client = connect(&server, 1, true);
    assert!(client.write(0, &[1; 4096]).is_err());
    assert_eq!(client.read(0, 4096).unwrap(), vec![0; 4096]);
    assert!(server.disk.contents().iter().all(|&b| b == 0));
}

#[test]
fn several_queues_work_at_once() {
    let server = InProcessServer::start(64 * MIB, 4, false);
    let mut client = connect(&server, 4, false);
    std::thread::scope(|s| {
        for (q, mut handle) in client.split().into_iter().enumerate() {
            s.spawn(move || {
                let base = q as u64 * 16 * MIB;
                let offsets: Vec<u64> = (0..256).map(|i| base + i * 4096).collect();
                handle
                    .run_batch(
                        &offsets,
                        4096,
                        16,
                        true,
                        |i, buf| pattern::fill(buf, offsets[i], 3),
                        |_, _, r| {
                            r.unwrap();
                            true
                        },
                    )
                    .unwrap();
                handle
                    .run_batch(
                        &offsets,
                        4096,
                        16,
                        false,
                        |_, _| {},
                        |i, buf, r| {
                            r.unwrap();
                            assert_eq!(buf, &pattern::make(4096, offsets[i], 3)[..]);
                            true
                        },
                    )
                    .unwrap();
            });
        }
    });
}

#[test]
fn a_new_client_is_served_after_one_dies() {
    let server = InProcessServer::start(4 * MIB, 1, false);
    let mut first = connect(&server, 1, false);
    first.write(0, &[3; 4096]).unwrap();
    drop(first);
    for round in 0..3u8 {
        let mut next = connect(&server, 1, false);
        assert_eq!(
            next.read(0, 4096).unwrap()[0],
            if round == 0 { 3 } else { round + 9 }
        );
        next.write(0, &[round + 10; 4096]).unwrap();
    }
}
