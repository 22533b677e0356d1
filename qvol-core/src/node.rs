//! Tree nodes of the block map and the space tree (docs/FORMAT.md §6, §7): 4096 bytes of 64
//! entries of 64 bytes; leaf entries point to data blocks, interior entries to child nodes.

use crate::error::{Error, Result};
use crate::layout::*;
use crate::subkeys::Subkeys;
use crate::suite::Tag;

/// Which tree a node belongs to (bound into its MAC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TreeKind {
    /// The block map: logical block -> data block.
    Map = 1,
    /// The space tree: allocation bitmap of physical blocks.
    Space = 2,
    /// The snapshot table's blocks (format version 4).
    Snapshots = 3,
}

/// A pointer to a tree node: where it is, the MAC it must have and its birth (the snapshot
/// epoch of the commit that wrote it, FORMAT.md §6.1). `pbn == 0`: no node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodePtr {
    /// Physical block of the node (0 = absent subtree).
    pub pbn: u64,
    /// The node's MAC.
    pub mac: [u8; 32],
    /// The snapshot epoch it was written in (0 before format version 4).
    pub birth: u32,
    /// Its portable MAC (FORMAT.md §6.2; zero without portable MACs).
    pub pmac: [u8; 16],
}

/// A leaf entry of the block map: where a logical block's ciphertext is and how to open it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeafEntry {
    /// Physical block of the data (0 = unallocated: reads as zeros).
    pub pbn: u64,
    /// The key epoch the block was sealed under (bits 0..23 of the field in format version 7).
    pub key_epoch: u32,
    /// Blocks of the compressed unit the entry references (bits 24..31 of the key epoch
    /// field, format version 7; FORMAT.md §18.2); 0 for a plain block.
    pub k: u8,
    /// The nonce (zero-padded to 32 bytes).
    pub nonce: [u8; 32],
    /// The AEAD tag.
    pub tag: Tag,
    /// The snapshot epoch the block was written in (FORMAT.md §6.1; 0 before version 4).
    pub birth: u32,
}

impl LeafEntry {
    /// Decodes entry `i` of a leaf node.
    pub fn decode(node: &[u8], i: usize) -> Result<LeafEntry> {
        let at = i * ENTRY_LEN;
        let e = &node[at..at + ENTRY_LEN];
        let field = get_u32(e, 8);
        let entry = LeafEntry {
            pbn: get_u64(e, 0),
            key_epoch: field & KEY_EPOCH_MASK,
            k: (field >> 24) as u8,
            nonce: get_array(e, 16),
            tag: get_array(e, 48),
            birth: get_u32(e, 12),
        };
        if entry.pbn == 0 && e.iter().any(|&b| b != 0) {
            return Err(Error::corrupt(format!(
                "map leaf entry {i} has invalid flags or fields"
            )));
        }
        let end = entry.pbn.saturating_add(u64::from(entry.k.max(1)));
        if entry.pbn != 0 && (entry.pbn < MIN_DATA_START_BLOCK || end > MAX_PBN) {
            return Err(Error::corrupt(format!(
                "map leaf entry {i} points outside the data region"
            )));
        }
        Ok(entry)
    }

    /// Encodes this entry as entry `i` of a leaf node.
    pub fn encode(&self, node: &mut [u8], i: usize) {
        let at = i * ENTRY_LEN;
        let e = &mut node[at..at + ENTRY_LEN];
        if self.pbn == 0 {
            e.fill(0);
            return;
        }
        put_u64(e, 0, self.pbn);
        put_u32(
            e,
            8,
            (self.key_epoch & KEY_EPOCH_MASK) | u32::from(self.k) << 24,
        );
        put_u32(e, 12, self.birth);
        e[16..48].copy_from_slice(&self.nonce);
        e[48..64].copy_from_slice(&self.tag);
    }
}

/// Decodes entry `i` of an interior node.
pub fn decode_interior_entry(node: &[u8], i: usize) -> Result<NodePtr> {
    let at = i * ENTRY_LEN;
    let e = &node[at..at + ENTRY_LEN];
    let ptr = NodePtr {
        pbn: get_u64(e, 0),
        mac: get_array(e, 32),
        birth: get_u32(e, 8),
        pmac: get_array(e, 16),
    };
    let reserved_ok = e[12..16].iter().all(|&b| b == 0);
    let empty_ok = ptr.pbn != 0 || e.iter().all(|&b| b == 0);
    if !reserved_ok
        || !empty_ok
        || (ptr.pbn != 0 && !(MIN_DATA_START_BLOCK..MAX_PBN).contains(&ptr.pbn))
    {
        return Err(Error::corrupt(format!("interior entry {i} is malformed")));
    }
    Ok(ptr)
}

/// Encodes `ptr` as entry `i` of an interior node.
pub(crate) fn encode_interior_entry(node: &mut [u8], i: usize, ptr: &NodePtr) {
    let at = i * ENTRY_LEN;
    let e = &mut node[at..at + ENTRY_LEN];
    e.fill(0);
    if ptr.pbn != 0 {
        put_u64(e, 0, ptr.pbn);
        put_u32(e, 8, ptr.birth);
        e[16..32].copy_from_slice(&ptr.pmac);
        e[32..64].copy_from_slice(&ptr.mac);
    }
}

/// Checks the structure of a map node (all 64 entries) without any key: for fuzzing and
/// `qvol check`. `level` 0 is a leaf.
pub fn decode_map_node(node: &[u8], level: u8) -> Result<Vec<NodePtrOrLeaf>> {
    if node.len() != BS {
        return Err(Error::corrupt(format!(
            "a map node is 4096 bytes, not {}",
            node.len()
        )));
    }
    (0..FANOUT as usize)
        .map(|i| {
            if level == 0 {
                LeafEntry::decode(node, i).map(NodePtrOrLeaf::Leaf)
            } else {
                decode_interior_entry(node, i).map(NodePtrOrLeaf::Child)
            }
        })
        .collect()
}

/// One decoded entry of a map node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePtrOrLeaf {
    /// An interior entry.
    Child(NodePtr),
    /// A leaf entry.
    Leaf(LeafEntry),
}

/// The MAC of a node: `BLAKE3-keyed(K_meta, "qvol-node-v1" || tree || level || 0u16 || 0u32
/// || u64le(index) || volume id || node)`.
pub(crate) fn node_mac(
    keys: &Subkeys,
    tree: TreeKind,
    level: u8,
    index: u64,
    node: &[u8],
) -> [u8; 32] {
    keyed_node_hash(keys, b"qvol-node-v1", tree, level, index, node)
}

/// The portable MAC of a node (FORMAT.md §6.2, images created as version 4): the MAC of its
/// content without what depends on where it and its children are (each entry's pbn and
/// birth, an interior entry's reserved bytes and the child's MAC, keeping the child's
/// portable MAC), truncated to 16 bytes. A copy of the tree laid out elsewhere has the same
/// portable MACs; zero for an image without portable MACs.
pub(crate) fn node_pmac(
    keys: &Subkeys,
    tree: TreeKind,
    level: u8,
    index: u64,
    node: &[u8],
) -> [u8; 16] {
    if !keys.portable_nodes() || node.len() != BS {
        return [0; 16];
    }
    let mut view = Box::new([0u8; BS]);
    view.copy_from_slice(node);
    for e in view.chunks_exact_mut(ENTRY_LEN) {
        if level == 0 {
            e[..8].fill(0);
            e[12..16].fill(0);
        } else {
            e[..16].fill(0);
            e[32..].fill(0);
        }
    }
    let full = keyed_node_hash(keys, b"qvol-node-p4", tree, level, index, &view[..]);
    get_array(&full, 0)
}

fn keyed_node_hash(
    keys: &Subkeys,
    label: &[u8; 12],
    tree: TreeKind,
    level: u8,
    index: u64,
    node: &[u8],
) -> [u8; 32] {
    let mut prefix = [0u8; 12 + 8 + 8 + 16];
    prefix[..12].copy_from_slice(label);
    prefix[12] = tree as u8;
    prefix[13] = level;
    put_u64(&mut prefix, 20, index);
    prefix[28..44].copy_from_slice(keys.volume_id());
    let mut h = keys.meta_mac();
    h.update(&prefix);
    h.update(node);
    *h.finalize().as_bytes()
}

/// Checks `node` against the MAC its parent holds (constant-time comparison).
pub(crate) fn verify_node(
    keys: &Subkeys,
    tree: TreeKind,
    level: u8,
    index: u64,
    node: &[u8],
    mac: &[u8; 32],
) -> bool {
    let computed = node_mac(keys, tree, level, index, node);
    blake3::Hash::from(computed) == blake3::Hash::from(*mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::VolumeKey;
    use crate::suite::CipherSuite;

    #[test]
    fn leaf_entries_round_trip() {
        let mut node = vec![0u8; BS];
        let e = LeafEntry {
            pbn: 5000,
            key_epoch: 0,
            k: 3,
            nonce: [3; 32],
            tag: [4; 16],
            birth: 9,
        };
        e.encode(&mut node, 63);
        assert_eq!(LeafEntry::decode(&node, 63).unwrap(), e);
        assert_eq!(LeafEntry::decode(&node, 0).unwrap(), LeafEntry::default());
        assert_eq!(decode_map_node(&node, 0).unwrap().len(), 64);
        node[12] = 1;
        assert!(
            LeafEntry::decode(&node, 0).is_err(),
            "an empty entry is all zero"
        );
    }

    #[test]
    fn interior_entries_round_trip() {
        let mut node = vec![0u8; BS];
        let p = NodePtr {
            pbn: 2000,
            mac: [8; 32],
            birth: 3,
            pmac: [6; 16],
        };
        encode_interior_entry(&mut node, 1, &p);
        assert_eq!(decode_interior_entry(&node, 1).unwrap(), p);
        node[ENTRY_LEN * 2 + 40] = 1;
        assert!(decode_map_node(&node, 1).is_err());
        node[ENTRY_LEN * 2 + 40] = 0;
        node[ENTRY_LEN + 13] = 1;
        assert!(decode_map_node(&node, 1).is_err(), "reserved bytes");
    }

    #[test]
    fn mac_binds_position_tree_and_content() {
        let keys = Subkeys::derive(
            &VolumeKey::from_bytes([5; 32]),
            CipherSuite::default(),
            [1; 16],
        );
        let node = vec![1u8; BS];
        let mac = node_mac(&keys, TreeKind::Map, 0, 3, &node);
        assert!(verify_node(&keys, TreeKind::Map, 0, 3, &node, &mac));
        assert!(!verify_node(&keys, TreeKind::Map, 0, 4, &node, &mac));
        assert!(!verify_node(&keys, TreeKind::Map, 1, 3, &node, &mac));
        assert!(!verify_node(&keys, TreeKind::Space, 0, 3, &node, &mac));
        let mut other = node.clone();
        other[100] ^= 1;
        assert!(!verify_node(&keys, TreeKind::Map, 0, 3, &other, &mac));
    }
}
