//! `Volume::check`: verifies everything reachable and the space accounting (qvol check, a
//! scrub through the daemon). It reads, never writes, and keeps going past damage so that it
//! can list every logical range and snapshot affected.

use std::collections::HashMap;

use crate::datablock::open_block;
use crate::error::Result;
use crate::layout::*;
use crate::node::{decode_interior_entry, LeafEntry, NodePtr, TreeKind};
use crate::snapshot::load_table;
use crate::storage::Storage;
use crate::tree::read_node;
use crate::volume::Volume;

/// One piece of damage `check` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// What holds it: `"live"`, `"snapshot NAME"`, `"space map"`, `"snapshot table"`.
    pub tree: String,
    /// The first logical block affected (for map trees).
    pub first_lbn: Option<u64>,
    /// How many logical blocks are affected from there (0 when none is).
    pub blocks: u64,
    /// One sentence.
    pub what: String,
}

/// What `check` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Tree nodes whose MAC was verified.
    pub nodes: u64,
    /// Data blocks whose tag was verified.
    pub data_blocks: u64,
    /// Snapshots checked.
    pub snapshots: usize,
    /// Blocks marked in use that nothing references (leaked space).
    pub leaked: u64,
    /// Everything damaged, in the order found.
    pub damage: Vec<Damage>,
}

impl CheckReport {
    /// Whether nothing is damaged and no space leaked.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty() && self.leaked == 0
    }
}

/// Where a block was found, to tell sharing (same place in two trees) from a block used
/// twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Fixed,
    Data(u64),
    /// A compressed unit's block, at its group's first logical block.
    Unit(u64),
    Map(u8, u64),
    Space(u8, u64),
    Table(u64),
}

struct Walk<'a> {
    st: &'a dyn Storage,
    vol: &'a Volume,
    used: HashMap<u64, Place>,
    /// The fields of each compressed unit claimed (`k`, key epoch, nonce, tag) by its first
    /// block: every map referencing it must agree (FORMAT.md §18.3 rule 4).
    units: HashMap<u64, (u8, u32, [u8; 32], crate::suite::Tag)>,
    /// The damage found under each block (a node's whole subtree), so that every tree
    /// sharing it is named.
    damaged: HashMap<u64, Vec<(Option<u64>, u64, String)>>,
    report: CheckReport,
    progress: &'a mut dyn FnMut(u64, u64),
    done: u64,
    total: u64,
}

impl Walk<'_> {
    fn damage(&mut self, tree: &str, first_lbn: Option<u64>, blocks: u64, what: String) {
        if let (Some(first), Some(last)) = (first_lbn, self.report.damage.last_mut()) {
            // Adjacent ranges of one tree with the same cause merge into one line.
            if last.tree == tree
                && last.what == what
                && last.first_lbn.map(|f| f + last.blocks) == Some(first)
            {
                last.blocks += blocks;
                return;
            }
        }
        self.report.damage.push(Damage {
            tree: tree.to_owned(),
            first_lbn,
            blocks,
            what,
        });
    }

    /// Records `pbn` at `place`; false if it was seen there already (a shared subtree,
    /// whose damage, if any, is then listed for this tree too).
    fn claim(&mut self, tree: &str, pbn: u64, place: Place) -> bool {
        match self.used.get(&pbn) {
            Some(p) if *p == place => {
                for (first, blocks, what) in self.damaged.get(&pbn).cloned().unwrap_or_default() {
                    self.damage(tree, first, blocks, what);
                }
                false
            }
            Some(p) => {
                let what = format!("block {pbn} is used twice ({p:?} and {place:?})");
                self.damage(tree, None, 0, what);
                false
            }
            None => {
                self.used.insert(pbn, place);
                true
            }
        }
    }

    fn tick(&mut self, n: u64) {
        self.done += n;
        (self.progress)(self.done.min(self.total), self.total);
    }

    /// Walks a map tree from `ptr`, node (`level`, `index`), verifying every node and (if
    /// `data`) every data block.
    fn map_node(&mut self, tree: &str, level: u8, index: u64, ptr: NodePtr, data: bool) {
        let span = FANOUT.pow(u32::from(level) + 1);
        let first = index * span;
        if ptr.pbn == 0 || !self.claim(tree, ptr.pbn, Place::Map(level, index)) {
            return;
        }
        let keys_now = self.vol.keys();
        let keys = &*keys_now;
        let page = match read_node(self.st, keys, TreeKind::Map, level, index, &ptr) {
            Ok(p) => p,
            Err(e) => {
                let blocks = span.min(self.vol.blocks().saturating_sub(first));
                self.damaged
                    .insert(ptr.pbn, vec![(Some(first), blocks, e.to_string())]);
                self.damage(tree, Some(first), blocks, e.to_string());
                return;
            }
        };
        self.report.nodes += 1;
        let before = self.report.damage.len();
        let units = self.vol.header.units();
        if level == 0 {
            if let Err(e) = crate::group::check_groups(&page[..], units) {
                self.damage(tree, Some(first), FANOUT, e.to_string());
            }
        }
        let group = self.vol.unit_blocks();
        // The group and unit last claimed.
        let mut last_unit = None;
        for i in 0..FANOUT as usize {
            let lbn = first + i as u64 * span / FANOUT;
            if level == 0 {
                match LeafEntry::decode(&page[..], i) {
                    // A unit is claimed and opened once, for the first entry of its group
                    // that references it (FORMAT.md §18.3 rule 4).
                    Ok(e) if e.pbn != 0 && e.k > 0 => {
                        if last_unit != Some((lbn / group, e.pbn)) {
                            last_unit = Some((lbn / group, e.pbn));
                            self.unit(tree, lbn, &e, data);
                        }
                    }
                    Ok(e) if e.pbn != 0 => self.data_block(tree, lbn, &e, data),
                    Ok(_) => {}
                    Err(e) => self.damage(tree, Some(lbn), 1, e.to_string()),
                }
            } else {
                match decode_interior_entry(&page[..], i) {
                    Ok(child) => {
                        self.map_node(tree, level - 1, index * FANOUT + i as u64, child, data)
                    }
                    Err(e) => self.damage(tree, Some(lbn), span / FANOUT, e.to_string()),
                }
            }
        }
        if self.report.damage.len() > before {
            let below = self.report.damage[before..]
                .iter()
                .filter(|d| d.tree == tree)
                .map(|d| (d.first_lbn, d.blocks, d.what.clone()))
                .collect();
            self.damaged.insert(ptr.pbn, below);
        }
    }

    fn data_block(&mut self, tree: &str, lbn: u64, e: &LeafEntry, verify: bool) {
        if !self.claim(tree, e.pbn, Place::Data(lbn)) {
            return;
        }
        if verify {
            self.verify_data(tree, lbn, e);
        }
    }

    /// The compressed unit `e` references from logical block `lbn`: all its blocks claimed
    /// at its group's position, and (if `verify`) opened.
    fn unit(&mut self, tree: &str, lbn: u64, e: &LeafEntry, verify: bool) {
        let n = self.vol.unit_blocks();
        let place = Place::Unit(lbn - lbn % n);
        let fields = (e.k, e.key_epoch, e.nonce, e.tag);
        match self.units.get(&e.pbn) {
            Some(seen) if *seen != fields => {
                let what = format!(
                    "maps disagree on the compressed unit at block {}: changed or replaced",
                    e.pbn
                );
                self.damage(tree, Some(lbn), 1, what);
                return;
            }
            Some(_) => {}
            None => {
                self.units.insert(e.pbn, fields);
            }
        }
        for pbn in e.pbn..e.pbn + u64::from(e.k) {
            if !self.claim(tree, pbn, place) {
                return;
            }
        }
        if verify {
            self.verify_data(tree, lbn, e);
        }
    }

    fn verify_data(&mut self, tree: &str, lbn: u64, e: &LeafEntry) {
        let mut block = zeroize::Zeroizing::new(vec![0u8; BS]);
        let ok = if e.k > 0 {
            self.vol.read_entry(lbn, e, &mut block).is_ok()
        } else {
            self.st
                .read_exact_at(&mut block, e.pbn * BLOCK_SIZE)
                .is_ok()
                && open_block(&self.vol.keys(), lbn, e, &mut block).is_ok()
        };
        let blocks = u64::from(e.k.max(1));
        self.report.data_blocks += blocks;
        self.tick(blocks);
        if !ok {
            let what = if e.k > 0 {
                format!(
                    "the compressed unit at block {} does not open: changed or replaced",
                    e.pbn
                )
            } else {
                format!("data block {} fails its tag: changed or replaced", e.pbn)
            };
            // A unit's damage covers its group's referencing entries; listed from `lbn`.
            self.damaged
                .insert(e.pbn, vec![(Some(lbn), 1, what.clone())]);
            self.damage(tree, Some(lbn), 1, what);
        }
    }

    /// Walks the space tree; returns its bitmap leaves.
    fn space_node(
        &mut self,
        level: u8,
        index: u64,
        ptr: NodePtr,
        leaves: &mut Vec<(u64, Vec<u8>)>,
    ) {
        if ptr.pbn == 0 || !self.claim("space map", ptr.pbn, Place::Space(level, index)) {
            return;
        }
        match read_node(
            self.st,
            &self.vol.keys(),
            TreeKind::Space,
            level,
            index,
            &ptr,
        ) {
            Err(e) => self.damage("space map", None, 0, e.to_string()),
            Ok(page) => {
                self.report.nodes += 1;
                if level == 0 {
                    leaves.push((index, page.to_vec()));
                    return;
                }
                for i in 0..FANOUT as usize {
                    match decode_interior_entry(&page[..], i) {
                        Ok(c) => self.space_node(level - 1, index * FANOUT + i as u64, c, leaves),
                        Err(e) => self.damage("space map", None, 0, e.to_string()),
                    }
                }
            }
        }
    }
}

impl Volume {
    /// Verifies everything reachable (FORMAT.md §7.1): every node MAC of the live map, the
    /// snapshots' maps, the space tree and the snapshot table; every data tag of the live
    /// disk (as it reads now, log included) and of every snapshot; and the space accounting
    /// of the last commit (no leaked block, no block used twice, nothing in use marked
    /// free). `progress(done, total)` is called as data blocks are verified. Commits wait
    /// while it runs.
    pub fn check(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<CheckReport> {
        self.check_usable()?;
        let _gate = self.shared();
        let sb = self.superblock().clone();
        let st = &*self.storage;
        let total = sb.allocated_blocks;
        let mut w = Walk {
            st,
            vol: self,
            used: HashMap::new(),
            units: HashMap::new(),
            damaged: HashMap::new(),
            report: CheckReport::default(),
            progress,
            done: 0,
            total,
        };
        let data_start = self.header.regions().data_start_block();
        if sb.staged_keyslots != 0 {
            for pbn in sb.staged_keyslots..sb.staged_keyslots + HEADER_AREA_BLOCKS {
                w.claim("header", pbn, Place::Fixed);
            }
        }
        // The snapshot table and the snapshots' maps.
        let snapshots = match load_table(st, &self.keys(), &sb.snapshots, sb.snap_epoch) {
            Ok((list, blocks)) => {
                for (i, pbn) in blocks.into_iter().enumerate() {
                    w.claim("snapshot table", pbn, Place::Table(i as u64));
                }
                list
            }
            Err(e) => {
                w.damage("snapshot table", None, 0, e.to_string());
                Vec::new()
            }
        };
        for s in &snapshots {
            let tree = format!("snapshot {}", s.name);
            w.map_node(&tree, s.map_height, 0, s.root, true);
        }
        // The live map as committed (its data is verified below, as it reads now).
        w.map_node("live", sb.map_height, 0, sb.map_root, false);
        w.report.snapshots = snapshots.len();
        let mut leaves = Vec::new();
        w.space_node(sb.space_height, 0, sb.space_root, &mut leaves);
        self.check_live_data(&mut w);
        // Space accounting: the committed bitmap against what the committed trees use.
        let mut marked = 0u64;
        for (index, bits) in &leaves {
            for (byte, &b) in bits.iter().enumerate() {
                for bit in (0..8).filter(|k| b & (1 << k) != 0) {
                    let pbn = index * BITS_PER_SPACE_LEAF + byte as u64 * 8 + bit;
                    if pbn < data_start {
                        continue;
                    }
                    marked += 1;
                    if !w.used.contains_key(&pbn) {
                        w.report.leaked += 1;
                    }
                }
            }
        }
        let bitmap: HashMap<u64, &Vec<u8>> = leaves.iter().map(|(i, b)| (*i, b)).collect();
        // A staged header area lies past the high-water mark, unmarked (FORMAT.md §3.1).
        let staged = match sb.staged_keyslots {
            0 => 0..0,
            at => at..at + HEADER_AREA_BLOCKS,
        };
        let mut free_but_used: Vec<u64> = w
            .used
            .keys()
            .copied()
            .filter(|pbn| !staged.contains(pbn))
            .filter(|&pbn| {
                let j = (pbn % BITS_PER_SPACE_LEAF) as usize;
                bitmap
                    .get(&(pbn / BITS_PER_SPACE_LEAF))
                    .is_none_or(|b| b[j / 8] & (1 << (j % 8)) == 0)
            })
            .collect();
        free_but_used.sort_unstable();
        if let Some(&first) = free_but_used.first() {
            let what = format!(
                "{} blocks in use are marked free in the space map (the first is block {first})",
                free_but_used.len()
            );
            w.damage("space map", None, 0, what);
        }
        if marked != sb.allocated_blocks {
            let what = format!(
                "the superblock counts {} blocks in use, the space map marks {marked}",
                sb.allocated_blocks
            );
            w.damage("space map", None, 0, what);
        }
        Ok(w.report)
    }

    /// Verifies every data block of the live disk as it reads now (the committed map and
    /// the log replayed over it).
    fn check_live_data(&self, w: &mut Walk<'_>) {
        let st = &*self.storage;
        let leaves = self.blocks().div_ceil(FANOUT);
        let mut leaf = 0;
        let mut entries = [LeafEntry::default(); FANOUT as usize];
        while leaf < leaves {
            match self.map.absent_leaves(st, &self.keys(), leaf) {
                Ok(0) => {}
                Ok(skip) => {
                    leaf += skip;
                    continue;
                }
                Err(_) => {
                    // Damage the committed walk has listed already.
                    leaf += 1;
                    continue;
                }
            }
            let first = leaf * FANOUT;
            let n = FANOUT.min(self.blocks() - first) as usize;
            if self
                .map
                .lookup(st, &self.keys(), first, &mut entries[..n])
                .is_ok()
            {
                let group = self.unit_blocks();
                let mut last_unit = None;
                for (i, e) in entries[..n].iter().enumerate() {
                    let lbn = first + i as u64;
                    // A unit is opened once for its group's entries.
                    let unit = (e.k > 0).then_some((lbn / group, e.pbn));
                    if e.pbn != 0 && (unit.is_none() || unit != last_unit) {
                        w.verify_data("live", lbn, e);
                    }
                    if unit.is_some() {
                        last_unit = unit;
                    }
                }
            }
            leaf += 1;
        }
    }
}
