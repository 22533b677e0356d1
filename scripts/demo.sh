#!/usr/bin/env bash
# qvol's demo (README command 1): installs what it needs, builds, creates a throwaway keystore
# and a small encrypted volume under .qvol-demo/, serves it with vhost-qvol, boots a tiny QEMU
# guest (TCG) that makes a filesystem, writes, reads back and checks data, and then shows what
# happened: the cipher suite and KEM, the bytes the guest wrote, and that the image file holds
# none of the plaintext.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

say() { printf '\n== %s\n' "$*"; }

say "Installing what the demo needs (scripts/setup.sh)"
./scripts/setup.sh

say "Building vhost-qvol and qvol (release)"
cargo build --release --locked -p vhost-qvol --bins
bin=$root/target/release

demo=$root/.qvol-demo
say "Creating a throwaway keystore and a 64 MiB encrypted volume in $demo"
if [ -S "$demo/disk.sock" ] || [ -e "$demo/vhost-qvol.pid" ]; then
    if [ -e "$demo/vhost-qvol.pid" ]; then kill "$(cat "$demo/vhost-qvol.pid")" 2>/dev/null || true; fi
fi
rm -rf "$demo"
mkdir -p "$demo"
export QVOL_KEYSTORE=$demo/keystore
unset QVOL_PASSPHRASE_FILE CREDENTIALS_DIRECTORY
"$bin/qvol" keystore init --keystore "$QVOL_KEYSTORE" --no-passphrase
key=$("$bin/qvol" key new demo-vm --keystore "$QVOL_KEYSTORE")
echo "key for demo-vm: $key"
"$bin/qvol" create "$demo/disk.qvol" --size 64M --key "$key"

say "Starting vhost-qvol on $demo/disk.sock"
volume_id=$("$bin/qvol" info "$demo/disk.qvol" --json | sed -n 's/.*"volume_id": "\([0-9a-f]*\)".*/\1/p')
RUST_LOG=${RUST_LOG:-info} "$bin/vhost-qvol" --socket-path "$demo/disk.sock" \
    --blk-file "$demo/disk.qvol" --volume-id "$volume_id" --keystore "$QVOL_KEYSTORE" --num-queues 1 \
    2>"$demo/vhost-qvol.log" &
daemon=$!
echo "$daemon" >"$demo/vhost-qvol.pid"
trap 'kill "$daemon" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    [ -S "$demo/disk.sock" ] && break
    kill -0 "$daemon" 2>/dev/null || { cat "$demo/vhost-qvol.log"; echo "vhost-qvol exited" >&2; exit 1; }
    sleep 0.1
done
[ -S "$demo/disk.sock" ] || { echo "vhost-qvol did not listen" >&2; exit 1; }

# A pattern no one else wrote: if it shows up in the image file, plaintext leaked.
pattern="qvol-demo-plaintext-$(date +%s)-$RANDOM"
cat >"$demo/guest.sh" <<GUEST
dev=/dev/vda
echo "guest: disk \$(cat /sys/block/vda/size) sectors"
mkfs.ext4 -q -F \$dev
mkdir -p /run/qvol/mnt
mount -t ext4 \$dev /run/qvol/mnt
cd /run/qvol/mnt
yes "$pattern" | head -c 4194304 > plaintext.txt
head -c 8388608 /dev/urandom > random.bin
sha256sum plaintext.txt random.bin > SUMS
cd /
umount /run/qvol/mnt
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro \$dev /run/qvol/mnt
cd /run/qvol/mnt
echo "guest: reading back after a remount:"
sha256sum -c SUMS
echo "guest: \$(grep -c "$pattern" plaintext.txt) lines of the pattern read back"
cd /
umount /run/qvol/mnt
e2fsck -fn \$dev >/dev/null && echo "guest: e2fsck -fn clean"
set -- \$(cat /sys/block/vda/stat)
echo "QVOL-DEMO-SECTORS-WRITTEN \$7"
echo "QVOL-DEMO-SECTORS-READ \$3"
GUEST

say "Booting the guest (QEMU, TCG; about 15 s)"
set +e
./scripts/guest/run-guest.sh "$demo/disk.sock" "$demo/guest.sh" "$demo/console.log" 300
guest_rc=$?
set -e
grep -E '^(guest:|[a-z.]+: OK|QVOL-GUEST-ERROR)' "$demo/console.log" || true
if [ "$guest_rc" -ne 0 ]; then
    echo "the guest script failed (status $guest_rc); console:" >&2
    cat "$demo/console.log" >&2
    exit 1
fi
if grep -qE 'I/O error|EXT4-fs error' "$demo/console.log"; then
    echo "the guest reported I/O errors:" >&2
    grep -E 'I/O error|EXT4-fs error' "$demo/console.log" >&2
    exit 1
fi

say "Stopping vhost-qvol (SIGTERM)"
kill -TERM "$daemon"
wait "$daemon" && echo "vhost-qvol exited cleanly" || { echo "vhost-qvol exited with $?" >&2; exit 1; }
trap - EXIT
rm -f "$demo/vhost-qvol.pid"

say "What happened"
"$bin/qvol" info "$demo/disk.qvol"
sectors_written=$(sed -n 's/^QVOL-DEMO-SECTORS-WRITTEN \([0-9]*\).*/\1/p' "$demo/console.log")
sectors_read=$(sed -n 's/^QVOL-DEMO-SECTORS-READ \([0-9]*\).*/\1/p' "$demo/console.log")
cipher=$("$bin/qvol" info "$demo/disk.qvol" --json | sed -n 's/^ *"cipher": *"\([^"]*\)".*/\1/p' | head -n1)
kem=$("$bin/qvol" info "$demo/disk.qvol" --json | sed -n 's/^ *"kem": *"\([^"]*\)".*/\1/p' | head -n1)
echo
echo "cipher suite:       ${cipher:-unknown} (data blocks, authenticated)"
echo "volume key wrapped: ${kem:-unknown} (keyslot for key $key)"
echo "guest wrote:        $((sectors_written * 512)) bytes to /dev/vda (its block-layer counters)"
echo "guest read:         $((sectors_read * 512)) bytes, and every checksum matched"
echo "image file:         $demo/disk.qvol, $(du -k --apparent-size "$demo/disk.qvol" | cut -f1) KiB apparent, $(du -k "$demo/disk.qvol" | cut -f1) KiB allocated"
hits=$(grep -c -a -F "$pattern" "$demo/disk.qvol" || true)
if [ "$hits" -ne 0 ]; then
    echo "PLAINTEXT LEAK: the image holds '$pattern' ($hits matches)" >&2
    exit 1
fi
echo "plaintext check:    '$pattern' (4 MiB of it in the guest) occurs 0 times in the image"
echo
echo "Demo finished: everything the guest wrote is encrypted and authenticated at rest."
echo "Files are in $demo (console.log, vhost-qvol.log); ./scripts/demo.sh starts afresh."
