//! Recovery shares: k-of-n split and recovery with every k-subset, too few shares, typos.

use qvol_keys::keyslot;
use qvol_keys::recovery::{self, RecoveryShare};
use qvol_keys::{ErrorKind, Secret32};

const VOL: [u8; 16] = [3; 16];

fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    (0u32..1 << n)
        .filter(|m| m.count_ones() as usize == k)
        .map(|m| (0..n).filter(|i| m & (1 << i) != 0).collect())
        .collect()
}

#[test]
fn every_k_subset_recovers_and_fewer_do_not() {
    for (k, n) in [(2u8, 2u8), (2, 3), (3, 5), (4, 5), (5, 5)] {
        let key = Secret32::random();
        let shares = recovery::split(&key, k, n, [9; 8]).unwrap();
        assert_eq!(shares.len(), usize::from(n));
        for subset in subsets(n.into(), k.into()) {
            let chosen: Vec<&RecoveryShare> = subset.iter().map(|&i| &shares[i]).collect();
            assert_eq!(
                recovery::combine(&chosen, k).unwrap(),
                key,
                "{k}-of-{n} subset {subset:?}"
            );
        }
        for subset in subsets(n.into(), usize::from(k) - 1) {
            let chosen: Vec<&RecoveryShare> = subset.iter().map(|&i| &shares[i]).collect();
            let err = recovery::combine(&chosen, k).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::TooFewShares);
        }
        // A duplicated share does not count twice.
        let dup = vec![&shares[0]; usize::from(k)];
        assert_eq!(
            recovery::combine(&dup, k).unwrap_err().kind(),
            ErrorKind::TooFewShares
        );
    }
}

#[test]
fn invalid_splits_are_refused() {
    let key = Secret32::random();
    for (k, n) in [(1, 3), (0, 0), (4, 3)] {
        assert_eq!(
            recovery::split(&key, k, n, [0; 8]).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
}

#[test]
fn shares_print_parse_and_catch_typos() {
    let key = Secret32::random();
    let shares = recovery::split(&key, 2, 3, [1; 8]).unwrap();
    let text = shares[1].to_string();
    assert!(text.starts_with("qvol-share-v1-"));
    let back: RecoveryShare = text.parse().unwrap();
    assert_eq!(back, shares[1]);
    assert_eq!((back.threshold(), back.count(), back.index()), (2, 3, 2));
    assert!(
        !format!("{back:?}").contains(&text[14..]),
        "Debug leaks the share"
    );
    // Every single-character typo in the hex part is caught.
    for i in 14..text.len() {
        let mut t = text.clone().into_bytes();
        t[i] = if t[i] == b'0' { b'1' } else { b'0' };
        let t = String::from_utf8(t).unwrap();
        assert!(t.parse::<RecoveryShare>().is_err(), "typo at {i} accepted");
    }
    assert!("qvol-share-v2-00".parse::<RecoveryShare>().is_err());
}

#[test]
fn recovery_slot_with_every_subset_and_with_wrong_shares() {
    let vk = Secret32::random();
    let (slot, shares) = keyslot::wrap_with_recovery(2, 4, &VOL, &vk).unwrap();
    let slots = vec![slot.clone()];
    for subset in subsets(4, 2) {
        let chosen: Vec<RecoveryShare> = subset.iter().map(|&i| shares[i].clone()).collect();
        assert_eq!(
            keyslot::unwrap_with_recovery(&slots, &chosen, &VOL)
                .unwrap()
                .1,
            vk
        );
    }
    let err = keyslot::unwrap_with_recovery(&slots, &shares[..1], &VOL).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooFewShares);
    assert!(
        err.to_string()
            .contains("1 distinct recovery share(s) given, 2 needed"),
        "{err}"
    );
    // Shares of another slot's set are not used.
    let (_, other) = keyslot::wrap_with_recovery(2, 2, &VOL, &vk).unwrap();
    let err = keyslot::unwrap_with_recovery(&slots, &other, &VOL).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoMatchingSlot);
    let info = keyslot::describe(&slot).unwrap();
    assert_eq!((info.threshold, info.shares), (Some(2), Some(4)));
}
