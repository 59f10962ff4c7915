//! Several nodes over one store: membership leases, charger ownership with
//! fencing epochs, and the reaping of dead nodes' chargers.
//!
//! | key | value |
//! |---|---|
//! | `("cluster", "member", node)` | [`MemberRecord`]: incarnation, address, lease |
//! | `("cluster", "owner", charger)` | [`OwnerRecord`]: node, incarnation, epoch |
//! | `("cluster", "owned", node, incarnation, charger)` | empty: what a node incarnation holds |
//! | `("cluster", "site", site)` | [`SiteOwner`]: the node managing the site's load, epoch |
//!
//! - A node registers at start with the next incarnation of its name and
//!   renews its lease every third of `lease_ms`. A renewal that finds its
//!   record declared dead (or taken by a newer incarnation) fails: the node
//!   has lost its chargers and must drop them.
//! - A charger's ownership is taken in one transaction when it attaches:
//!   free, released, held by a dead or stale member, or held by this node's
//!   own earlier connection — then the epoch goes up by one. Held by a live
//!   member: refused (the charger keeps its first connection, as on one node).
//! - Every write a charger's actors make goes through a [`FencedStore`]:
//!   the transaction first reads the owner record and aborts with
//!   [`StoreError::Fenced`] unless it is still this node, incarnation and
//!   epoch. The read is part of the transaction, so a takeover that commits
//!   first makes the older owner's commit conflict and then fail the check.
//!   A node that was paused (SIGSTOP, a long GC, a partition) and resumes
//!   cannot write for a charger another node has taken.
//! - Any node reaps: a member whose lease expired is declared dead, and
//!   each charger it still owned is released with a higher epoch and its
//!   active sessions marked interrupted, until the charger reconnects
//!   (anywhere) and its events resume them.
//!
//! - A site's load is managed by one node at a time: the first node that
//!   needs the site's manager takes the site ([`hold_site`]) unless a live
//!   member holds it; the epoch goes up with every change of hands, and the
//!   holder checks it is still the holder ([`holds_site`]) before it sends
//!   chargers new limits, so a node that was paused and resumes does not
//!   plan over the new manager.
//!
//! Leases compare wall clocks of different nodes: keep them in sync (NTP),
//! with skew well under `lease_ms`. Fencing does not depend on clocks.

use laddnet_store::{SharedStore, Store, StoreError, StoreExt, Transaction, keys};
use serde::{Deserialize, Serialize};

use crate::repo::RepoError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberRecord {
    pub node: String,
    pub incarnation: u64,
    /// Where other nodes reach its mutual-TLS listener (`host:port`).
    pub address: String,
    /// The name other nodes check in its certificate.
    #[serde(default)]
    pub server_name: String,
    pub lease_expires_ms: i64,
    pub started_ms: i64,
    /// Declared dead by a reaper (its lease had expired).
    pub dead: bool,
}

impl MemberRecord {
    pub fn alive(&self, now_ms: i64) -> bool {
        !self.dead && self.lease_expires_ms > now_ms
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnerRecord {
    pub node: String,
    pub incarnation: u64,
    pub epoch: u64,
    pub since_ms: i64,
    /// The connection ended (or its node died): anyone may take it.
    pub released: bool,
}

/// What a charger's writer must still be: checked in every transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub charger_id: String,
    pub node: String,
    pub incarnation: u64,
    pub epoch: u64,
}

fn member_key(node: &str) -> Vec<u8> {
    keys::pack(&("cluster", "member", node))
}

fn owner_key(charger: &str) -> Vec<u8> {
    keys::pack(&("cluster", "owner", charger))
}

fn owned_key(node: &str, incarnation: u64, charger: &str) -> Vec<u8> {
    keys::pack(&("cluster", "owned", node, incarnation as i64, charger))
}

fn get_json<T: serde::de::DeserializeOwned>(tx: &mut dyn Transaction, key: &[u8]) -> Result<Option<T>, StoreError> {
    match tx.get(key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| StoreError::Corrupted(format!("cluster record: {e}"))),
    }
}

fn put_json<T: Serialize>(tx: &mut dyn Transaction, key: &[u8], v: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(v).map_err(|e| StoreError::Internal(e.to_string()))?;
    tx.set(key, &bytes)
}

/// `node`'s member record when it is still incarnation `incarnation` and
/// alive at `now_ms`: whether what that incarnation holds is still held.
fn live_member(
    tx: &mut dyn Transaction,
    node: &str,
    incarnation: u64,
    now_ms: i64,
) -> Result<Option<MemberRecord>, StoreError> {
    let m: Option<MemberRecord> = get_json(tx, &member_key(node))?;
    Ok(m.filter(|m| m.incarnation == incarnation && m.alive(now_ms)))
}

/// Fails with [`StoreError::Fenced`] unless `fence` still owns its charger.
pub fn check_fence(tx: &mut dyn Transaction, fence: &Fence) -> Result<(), StoreError> {
    let owner: Option<OwnerRecord> = get_json(tx, &owner_key(&fence.charger_id))?;
    match owner {
        Some(o)
            if !o.released && o.node == fence.node && o.incarnation == fence.incarnation && o.epoch == fence.epoch =>
        {
            Ok(())
        }
        Some(o) => Err(StoreError::Fenced(format!(
            "charger {} is now owned by {} (incarnation {}, epoch {}{}); this writer holds epoch {}",
            fence.charger_id,
            o.node,
            o.incarnation,
            o.epoch,
            if o.released { ", released" } else { "" },
            fence.epoch
        ))),
        None => Err(StoreError::Fenced(format!("charger {} has no owner", fence.charger_id))),
    }
}

/// A store whose write transactions first check a charger's fence: what a
/// charger's actors write is refused once another node owns the charger.
pub struct FencedStore {
    inner: SharedStore,
    fence: Fence,
}

impl FencedStore {
    pub fn new(inner: SharedStore, fence: Fence) -> Self {
        Self { inner, fence }
    }
    pub fn fence(&self) -> &Fence {
        &self.fence
    }
}

impl Store for FencedStore {
    fn run(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let fence = &self.fence;
        self.inner.run(&mut |tx| {
            check_fence(tx, fence)?;
            f(tx)
        })
    }

    fn read(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
        self.inner.read(f)
    }

    fn watch(&self, key: &[u8], seen: Option<&[u8]>, timeout: std::time::Duration) -> Result<bool, StoreError> {
        self.inner.watch(key, seen, timeout)
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn queues(&self) -> bool {
        self.inner.queues()
    }

    fn local_reads(&self) -> bool {
        self.inner.local_reads()
    }

    fn submit(&self, job: Box<dyn laddnet_store::Job>) {
        self.inner.submit(Box::new(FencedJob {
            fence: self.fence.clone(),
            job,
        }))
    }
}

/// A queued job that first checks the fence, inside its transaction.
struct FencedJob {
    fence: Fence,
    job: Box<dyn laddnet_store::Job>,
}

impl laddnet_store::Job for FencedJob {
    fn run(&mut self, tx: &mut dyn Transaction) -> Result<(), StoreError> {
        check_fence(tx, &self.fence)?;
        self.job.run(tx)
    }
    fn done(self: Box<Self>, result: Result<(), StoreError>) {
        self.job.done(result)
    }
}

/// Registers `node` with the next incarnation and a fresh lease.
pub fn register(
    store: &dyn Store,
    node: &str,
    (address, server_name): (&str, &str),
    lease_ms: i64,
    now_ms: i64,
) -> Result<MemberRecord, RepoError> {
    Ok(store.transact(|tx| {
        let prev: Option<MemberRecord> = get_json(tx, &member_key(node))?;
        if let Some(p) = &prev
            && p.alive(now_ms)
        {
            // The same name still holds a lease: a restart faster than the
            // lease, or two nodes configured with one name. The newer
            // incarnation wins; the older one's chargers are fenced off.
            tracing::warn!(node = %node, incarnation = p.incarnation, "replacing a live member of the same name");
        }
        let m = MemberRecord {
            node: node.to_string(),
            incarnation: prev.map_or(1, |p| p.incarnation + 1),
            address: address.to_string(),
            server_name: server_name.to_string(),
            lease_expires_ms: now_ms + lease_ms,
            started_ms: now_ms,
            dead: false,
        };
        put_json(tx, &member_key(node), &m)?;
        Ok::<_, StoreError>(m)
    })?)
}

/// Extends `me`'s lease. False: it was declared dead or replaced, and
/// everything it owned may have been taken: the node must drop its chargers.
pub fn renew(store: &dyn Store, me: &MemberRecord, lease_ms: i64, now_ms: i64) -> Result<bool, RepoError> {
    Ok(store.transact(|tx| {
        let cur: Option<MemberRecord> = get_json(tx, &member_key(&me.node))?;
        match cur {
            Some(mut c) if c.incarnation == me.incarnation && !c.dead => {
                c.lease_expires_ms = now_ms + lease_ms;
                put_json(tx, &member_key(&me.node), &c)?;
                Ok::<_, StoreError>(true)
            }
            _ => Ok(false),
        }
    })?)
}

/// Leaves the cluster at shutdown: the lease ends now, so a reaper releases
/// whatever is left at once instead of after the lease.
pub fn leave(store: &dyn Store, me: &MemberRecord) -> Result<(), RepoError> {
    Ok(store.transact(|tx| {
        if let Some(mut c) = get_json::<MemberRecord>(tx, &member_key(&me.node))?
            && c.incarnation == me.incarnation
        {
            c.dead = true;
            c.lease_expires_ms = 0;
            put_json(tx, &member_key(&me.node), &c)?;
        }
        Ok::<_, StoreError>(())
    })?)
}

/// Every member record, alive or not.
pub fn members(store: &dyn Store) -> Result<Vec<MemberRecord>, RepoError> {
    let (b, e) = keys::tuple_range(&("cluster", "member"));
    Ok(store.snapshot(|tx| {
        tx.get_range(&b, &e, 0, false)?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| StoreError::Corrupted(format!("member: {e}"))))
            .collect::<Result<Vec<MemberRecord>, _>>()
    })?)
}

pub fn get_owner(store: &dyn Store, charger: &str) -> Result<Option<OwnerRecord>, RepoError> {
    Ok(store.snapshot(|tx| get_json(tx, &owner_key(charger)))?)
}

/// Where a charger is connected now, if anywhere: its owner record and the
/// owning member, when that member is alive and the ownership current.
pub fn locate(store: &dyn Store, charger: &str, now_ms: i64) -> Result<Option<(OwnerRecord, MemberRecord)>, RepoError> {
    Ok(store.snapshot(|tx| {
        let Some(o) = get_json::<OwnerRecord>(tx, &owner_key(charger))? else {
            return Ok::<_, StoreError>(None);
        };
        if o.released {
            return Ok(None);
        }
        Ok(live_member(tx, &o.node, o.incarnation, now_ms)?.map(|m| (o, m)))
    })?)
}

/// Where each of `chargers` is connected now ([`locate`] for many: the
/// members are read once, each owner record on its own). Chargers
/// connected nowhere are left out.
pub fn locate_many(
    store: &dyn Store,
    chargers: &[String],
    now_ms: i64,
) -> Result<std::collections::HashMap<String, (OwnerRecord, MemberRecord)>, RepoError> {
    let live: std::collections::HashMap<String, MemberRecord> = members(store)?
        .into_iter()
        .filter(|m| m.alive(now_ms))
        .map(|m| (m.node.clone(), m))
        .collect();
    let mut out = std::collections::HashMap::new();
    if live.is_empty() {
        return Ok(out);
    }
    for c in chargers {
        if let Some(o) = get_owner(store, c)?
            && !o.released
            && let Some(m) = live.get(&o.node)
            && m.incarnation == o.incarnation
        {
            out.insert(c.clone(), (o, m.clone()));
        }
    }
    Ok(out)
}

/// The outcome of an attach's ownership transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Takeover {
    /// This node owns the charger now, under this fence.
    Taken(Fence),
    /// A live member holds it (the charger's other connection is alive).
    /// A live member holds it; its lease runs until `until_ms` unless renewed.
    HeldBy {
        node: String,
        address: String,
        until_ms: i64,
    },
}

/// Takes `charger` for `me` unless a live member holds it.
pub fn take(store: &dyn Store, charger: &str, me: &MemberRecord, now_ms: i64) -> Result<Takeover, RepoError> {
    Ok(store.transact(|tx| take_in(tx, charger, me, now_ms))?)
}

/// An attach's one durable write, in the caller's transaction: takes
/// `charger` for `me` and, if taken, records its boot (`rec`). Returns the
/// takeover and the stored record (None when a live member holds the
/// charger).
pub fn take_and_boot_in(
    tx: &mut dyn Transaction,
    charger: &str,
    me: &MemberRecord,
    now_ms: i64,
    rec: crate::repo::ChargerRecord,
) -> Result<(Takeover, Option<crate::repo::ChargerRecord>), RepoError> {
    let taken = take_in(tx, charger, me, now_ms)?;
    let stored = match &taken {
        Takeover::Taken(_) => Some(crate::repo::record_boot_in(tx, rec)?),
        Takeover::HeldBy { .. } => None,
    };
    Ok((taken, stored))
}

/// [`take`] inside a caller's transaction (an attach takes the charger
/// and records its boot in one).
pub fn take_in(
    tx: &mut dyn Transaction,
    charger: &str,
    me: &MemberRecord,
    now_ms: i64,
) -> Result<Takeover, StoreError> {
    let prev: Option<OwnerRecord> = get_json(tx, &owner_key(charger))?;
    if let Some(o) = &prev
        && !o.released
        && o.node != me.node
        && let Some(h) = live_member(tx, &o.node, o.incarnation, now_ms)?
    {
        return Ok(Takeover::HeldBy {
            until_ms: h.lease_expires_ms,
            node: h.node,
            address: h.address,
        });
    }
    if let Some(o) = &prev
        && !o.released
    {
        tx.clear(&owned_key(&o.node, o.incarnation, charger))?;
    }
    let epoch = prev.map_or(0, |o| o.epoch) + 1;
    let rec = OwnerRecord {
        node: me.node.clone(),
        incarnation: me.incarnation,
        epoch,
        since_ms: now_ms,
        released: false,
    };
    put_json(tx, &owner_key(charger), &rec)?;
    tx.set(&owned_key(&me.node, me.incarnation, charger), b"")?;
    Ok(Takeover::Taken(Fence {
        charger_id: charger.to_string(),
        node: me.node.clone(),
        incarnation: me.incarnation,
        epoch,
    }))
}

/// The charger's connection ended: its active sessions become interrupted
/// and the ownership is released, in one fenced transaction. Returns the
/// interrupted sessions; fails with `Fenced` if another node owns it now
/// (its sessions are then that node's business).
pub fn release(store: &dyn Store, fence: &Fence, now_s: i64) -> Result<Vec<String>, RepoError> {
    store.transact(|tx| {
        check_fence(tx, fence)?;
        let ids = crate::repo::interrupt_sessions_in(tx, &fence.charger_id, now_s)?;
        let rec = OwnerRecord {
            node: fence.node.clone(),
            incarnation: fence.incarnation,
            epoch: fence.epoch,
            since_ms: now_s * 1000,
            released: true,
        };
        put_json(tx, &owner_key(&fence.charger_id), &rec)?;
        tx.clear(&owned_key(&fence.node, fence.incarnation, &fence.charger_id))?;
        Ok(ids)
    })
}

/// Stale ownership entries released in one transaction by [`reap`].
const REAP_CHUNK: usize = 128;

fn unpack_owned(k: &[u8]) -> Result<(String, String, String, i64, String), StoreError> {
    keys::unpack::<(String, String, String, i64, String)>(k)
        .map_err(|e| StoreError::Corrupted(format!("owned index: {e:?}")))
}

/// What one reaping pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// Members newly declared dead.
    pub dead: Vec<String>,
    /// Chargers released, with the sessions marked interrupted.
    pub chargers: Vec<(String, Vec<String>)>,
}

/// Declares members with expired leases dead and releases up to `batch`
/// chargers still owned by dead members or by earlier incarnations.
pub fn reap(store: &dyn Store, now_ms: i64, batch: usize) -> Result<Reaped, RepoError> {
    let mut out = Reaped::default();
    for m in members(store)? {
        if !m.dead && m.lease_expires_ms <= now_ms {
            let declared = store.transact(|tx| match get_json::<MemberRecord>(tx, &member_key(&m.node))? {
                Some(mut c) if c.incarnation == m.incarnation && !c.dead && c.lease_expires_ms <= now_ms => {
                    c.dead = true;
                    put_json(tx, &member_key(&m.node), &c)?;
                    Ok::<_, StoreError>(true)
                }
                _ => Ok(false),
            })?;
            if declared {
                out.dead.push(m.node.clone());
            }
        }
    }
    // Ownership index entries of incarnations that are not the live one.
    // The index is ordered by node and incarnation, so one read finds
    // each incarnation's first entry and a live one's whole range is
    // stepped over: the reads grow with incarnations and the batch, not
    // with the chargers the live members hold (a pass runs every quarter
    // lease).
    let live: std::collections::HashMap<String, (u64, bool)> = members(store)?
        .into_iter()
        .map(|m| (m.node.clone(), (m.incarnation, m.alive(now_ms))))
        .collect();
    let stale = store.snapshot(|tx| {
        let mut stale: Vec<(String, u64, String)> = Vec::new();
        let (mut from, end) = keys::tuple_range(&("cluster", "owned"));
        while stale.len() < batch {
            let Some((k, _)) = tx.get_range(&from, &end, 1, false)?.into_iter().next() else {
                break;
            };
            let (_, _, node, inc, _) = unpack_owned(&k)?;
            let (group, group_end) = keys::tuple_range(&("cluster", "owned", node.as_str(), inc));
            let current = matches!(live.get(&node), Some((live_inc, alive)) if *live_inc == inc as u64 && *alive);
            if !current {
                for (k, _) in tx.get_range(&group, &group_end, batch - stale.len(), false)? {
                    let (_, _, node, inc, charger) = unpack_owned(&k)?;
                    stale.push((node, inc as u64, charger));
                }
            }
            from = group_end;
        }
        Ok::<_, StoreError>(stale)
    })?;
    // Released a chunk per transaction: a restarted node's earlier
    // incarnation may leave thousands, and one durable commit each would
    // compete with their reconnect storm for the disk and the core.
    let now_s = now_ms.div_euclid(1000);
    for chunk in stale.chunks(REAP_CHUNK) {
        let released = store.transact(|tx| {
            let mut released = Vec::new();
            for (node, inc, charger) in chunk {
                tx.clear(&owned_key(node, *inc, charger))?;
                match get_json::<OwnerRecord>(tx, &owner_key(charger))? {
                    Some(o) if !o.released && o.node == *node && o.incarnation == *inc => {
                        let ids = crate::repo::interrupt_sessions_in(tx, charger, now_s)?;
                        let rec = OwnerRecord {
                            epoch: o.epoch + 1,
                            released: true,
                            since_ms: now_ms,
                            ..o
                        };
                        put_json(tx, &owner_key(charger), &rec)?;
                        released.push((charger.clone(), ids));
                    }
                    _ => {}
                }
            }
            Ok::<_, RepoError>(released)
        })?;
        out.chargers.extend(released);
    }
    Ok(out)
}

/// How many chargers each member incarnation holds (for `Members`).
pub fn owned_counts(store: &dyn Store) -> Result<std::collections::HashMap<(String, u64), u64>, RepoError> {
    let (b, e) = keys::tuple_range(&("cluster", "owned"));
    let mut counts = std::collections::HashMap::new();
    store.snapshot(|tx| {
        for (k, _) in tx.get_range(&b, &e, 0, false)? {
            if let Ok(t) = keys::unpack::<(String, String, String, i64, String)>(&k) {
                *counts.entry((t.2, t.3 as u64)).or_insert(0) += 1;
            }
        }
        Ok::<_, StoreError>(())
    })?;
    Ok(counts)
}

/// Who manages a site's load: a node incarnation under an epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SiteOwner {
    pub node: String,
    pub incarnation: u64,
    pub epoch: u64,
    pub since_ms: i64,
}

/// The answer of [`hold_site`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteHolder {
    /// This node manages the site, under this epoch.
    Mine(u64),
    /// A live member manages it.
    Other(MemberRecord),
}

fn site_key(site: &str) -> Vec<u8> {
    keys::pack(&("cluster", "site", site))
}

/// The site's manager: the live member that holds it, or `me`, which then
/// takes it (a higher epoch) when it was free or held by a member that is
/// dead, gone or of an earlier incarnation.
pub fn hold_site(store: &dyn Store, site: &str, me: &MemberRecord, now_ms: i64) -> Result<SiteHolder, RepoError> {
    Ok(store.transact(|tx| {
        let prev: Option<SiteOwner> = get_json(tx, &site_key(site))?;
        if let Some(o) = &prev {
            if o.node == me.node && o.incarnation == me.incarnation {
                return Ok::<_, StoreError>(SiteHolder::Mine(o.epoch));
            }
            if let Some(h) = live_member(tx, &o.node, o.incarnation, now_ms)? {
                return Ok(SiteHolder::Other(h));
            }
        }
        let epoch = prev.map_or(0, |o| o.epoch) + 1;
        let rec = SiteOwner {
            node: me.node.clone(),
            incarnation: me.incarnation,
            epoch,
            since_ms: now_ms,
        };
        put_json(tx, &site_key(site), &rec)?;
        Ok(SiteHolder::Mine(epoch))
    })?)
}

/// Whether `me` still manages `site` under `epoch`.
pub fn holds_site(store: &dyn Store, site: &str, me: &MemberRecord, epoch: u64) -> Result<bool, RepoError> {
    let o: Option<SiteOwner> = store.snapshot(|tx| get_json(tx, &site_key(site)))?;
    Ok(o.is_some_and(|o| o.node == me.node && o.incarnation == me.incarnation && o.epoch == epoch))
}

/// The live member managing `site`, if any (a read: nothing is taken).
pub fn site_manager(
    store: &dyn Store,
    site: &str,
    now_ms: i64,
) -> Result<Option<(SiteOwner, MemberRecord)>, RepoError> {
    Ok(store.snapshot(|tx| {
        let Some(o) = get_json::<SiteOwner>(tx, &site_key(site))? else {
            return Ok::<_, StoreError>(None);
        };
        Ok(live_member(tx, &o.node, o.incarnation, now_ms)?.map(|m| (o, m)))
    })?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn store() -> (tempfile::TempDir, SharedStore) {
        let d = tempfile::tempdir().unwrap();
        let s = laddnet_store::RedbStore::open(d.path().join("s.redb")).unwrap();
        (d, Arc::new(s))
    }

    #[test]
    fn a_live_owner_keeps_its_charger_and_a_dead_ones_is_taken_with_a_higher_epoch() {
        let (_d, s) = store();
        let a = register(s.as_ref(), "a", ("127.0.0.1:1", "localhost"), 1_000, 0).unwrap();
        let b = register(s.as_ref(), "b", ("127.0.0.1:2", "localhost"), 1_000, 0).unwrap();
        let Takeover::Taken(fa) = take(s.as_ref(), "CP-1", &a, 10).unwrap() else {
            panic!("free charger not taken")
        };
        assert_eq!(fa.epoch, 1);
        assert_eq!(
            take(s.as_ref(), "CP-1", &b, 20).unwrap(),
            Takeover::HeldBy {
                node: "a".into(),
                address: "127.0.0.1:1".into(),
                until_ms: 1_000,
            }
        );
        // a's lease runs out: b takes over, and a's writes are fenced.
        assert!(renew(s.as_ref(), &b, 1_000, 900).unwrap());
        let Takeover::Taken(fb) = take(s.as_ref(), "CP-1", &b, 1_500).unwrap() else {
            panic!("a dead member's charger not taken")
        };
        assert_eq!(fb.epoch, 2);
        let fenced = FencedStore::new(s.clone(), fa.clone());
        let r = fenced.transact(|tx| tx.set(b"x", b"y"));
        assert!(matches!(r, Err(StoreError::Fenced(_))), "{r:?}");
        assert_eq!(s.snapshot(|tx| tx.get(b"x")).unwrap(), None, "nothing written");
        let ok = FencedStore::new(s.clone(), fb.clone());
        ok.transact(|tx| tx.set(b"x", b"y")).unwrap();
        // a comes back: it is dead, so its renewal fails.
        let reaped = reap(s.as_ref(), 1_600, 100).unwrap();
        assert_eq!(reaped.dead, vec!["a".to_string()]);
        assert!(!renew(s.as_ref(), &a, 1_000, 1_700).unwrap());
        // Its release is fenced too.
        assert!(release(s.as_ref(), &fa, 2).is_err());
        assert!(release(s.as_ref(), &fb, 2).is_ok());
    }

    #[test]
    fn the_reaper_releases_a_dead_members_chargers_once() {
        let (_d, s) = store();
        let a = register(s.as_ref(), "a", ("x:1", "x"), 1_000, 0).unwrap();
        for c in ["CP-1", "CP-2"] {
            assert!(matches!(take(s.as_ref(), c, &a, 0).unwrap(), Takeover::Taken(_)));
        }
        assert_eq!(reap(s.as_ref(), 500, 100).unwrap(), Reaped::default(), "alive: nothing");
        let r = reap(s.as_ref(), 2_000, 100).unwrap();
        assert_eq!(r.dead, vec!["a".to_string()]);
        assert_eq!(r.chargers.len(), 2);
        assert_eq!(get_owner(s.as_ref(), "CP-1").unwrap().unwrap().epoch, 2);
        assert!(get_owner(s.as_ref(), "CP-1").unwrap().unwrap().released);
        assert_eq!(reap(s.as_ref(), 3_000, 100).unwrap(), Reaped::default(), "only once");
        // A restart is a new incarnation; its old incarnation's chargers are stale.
        let a2 = register(s.as_ref(), "a", ("x:1", "x"), 1_000, 3_000).unwrap();
        assert_eq!(a2.incarnation, 2);
        assert!(matches!(take(s.as_ref(), "CP-1", &a2, 3_000).unwrap(), Takeover::Taken(f) if f.epoch == 3));
    }

    /// The store, counting the rows range reads return and the commits.
    struct Counting {
        inner: SharedStore,
        rows: std::sync::atomic::AtomicUsize,
        commits: std::sync::atomic::AtomicUsize,
    }

    struct CountingTx<'a>(&'a mut dyn Transaction, &'a std::sync::atomic::AtomicUsize);

    impl Transaction for CountingTx<'_> {
        fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get(key)
        }
        fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
            self.0.set(key, value)
        }
        fn clear(&mut self, key: &[u8]) -> Result<(), StoreError> {
            self.0.clear(key)
        }
        fn get_range(
            &mut self,
            begin: &[u8],
            end: &[u8],
            limit: usize,
            reverse: bool,
        ) -> Result<Vec<laddnet_store::KeyValue>, StoreError> {
            let rows = self.0.get_range(begin, end, limit, reverse)?;
            self.1.fetch_add(rows.len(), std::sync::atomic::Ordering::Relaxed);
            Ok(rows)
        }
        fn atomic_add(&mut self, key: &[u8], delta: i64) -> Result<(), StoreError> {
            self.0.atomic_add(key, delta)
        }
    }

    impl Store for Counting {
        fn run(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
            self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.run(&mut |tx| f(&mut CountingTx(tx, &self.rows)))
        }
        fn read(&self, f: &mut dyn FnMut(&mut dyn Transaction) -> Result<(), StoreError>) -> Result<(), StoreError> {
            self.inner.read(&mut |tx| f(&mut CountingTx(tx, &self.rows)))
        }
        fn watch(&self, key: &[u8], seen: Option<&[u8]>, timeout: std::time::Duration) -> Result<bool, StoreError> {
            self.inner.watch(key, seen, timeout)
        }
        fn backend(&self) -> &'static str {
            "counting"
        }
    }

    #[test]
    fn reaping_reads_only_stale_incarnations_and_releases_them_a_chunk_per_commit() {
        let (_d, s) = store();
        let a1 = register(s.as_ref(), "a", ("x:1", "x"), 1_000, 0).unwrap();
        let b = register(s.as_ref(), "b", ("x:2", "x"), 1_000_000, 0).unwrap();
        let take_all = |me: &MemberRecord, prefix: &str, n: usize| {
            s.transact(|tx| {
                for i in 0..n {
                    assert!(matches!(
                        take_in(tx, &format!("{prefix}-{i:04}"), me, 0)?,
                        Takeover::Taken(_)
                    ));
                }
                Ok::<_, StoreError>(())
            })
            .unwrap()
        };
        take_all(&a1, "A", 700);
        take_all(&b, "B", 2_000);
        // a restarts: a new incarnation, and the old one's 700 are stale.
        let a2 = register(s.as_ref(), "a", ("x:1", "x"), 1_000_000, 10).unwrap();
        assert_eq!(a2.incarnation, 2);
        let counting = Counting {
            inner: s.clone(),
            rows: Default::default(),
            commits: Default::default(),
        };
        let mut released = std::collections::BTreeSet::new();
        for pass in 0.. {
            counting.rows.store(0, std::sync::atomic::Ordering::Relaxed);
            counting.commits.store(0, std::sync::atomic::Ordering::Relaxed);
            let r = reap(&counting, 20, 300).unwrap();
            let (rows, commits) = (
                counting.rows.load(std::sync::atomic::Ordering::Relaxed),
                counting.commits.load(std::sync::atomic::Ordering::Relaxed),
            );
            // Members (2) twice, the first entry of each incarnation met,
            // and the stale entries of this batch: b's 2,000 are stepped
            // over, not read.
            assert!(rows <= 4 + 3 + 300, "pass {pass}: {rows} rows read");
            assert!(
                commits <= 3,
                "pass {pass}: {commits} commits for {} chargers",
                r.chargers.len()
            );
            assert!(r.chargers.len() <= 300);
            if r.chargers.is_empty() {
                break;
            }
            for (c, _) in r.chargers {
                assert!(c.starts_with("A-"), "{c}: a live member's charger released");
                assert!(released.insert(c), "released twice");
            }
        }
        assert_eq!(released.len(), 700);
        assert!(get_owner(s.as_ref(), "A-0000").unwrap().unwrap().released);
        let kept = get_owner(s.as_ref(), "B-1999").unwrap().unwrap();
        assert!(!kept.released && kept.node == "b");
        assert_eq!(
            owned_counts(s.as_ref()).unwrap().get(&("b".to_string(), b.incarnation)),
            Some(&2_000)
        );
    }

    #[test]
    fn a_site_is_managed_by_one_live_member_and_moves_with_a_higher_epoch() {
        let (_d, s) = store();
        let a = register(s.as_ref(), "a", ("x:1", "x"), 1_000, 0).unwrap();
        let b = register(s.as_ref(), "b", ("x:2", "x"), 1_000, 0).unwrap();
        assert_eq!(site_manager(s.as_ref(), "S-1", 10).unwrap(), None, "nobody yet");
        assert_eq!(hold_site(s.as_ref(), "S-1", &a, 10).unwrap(), SiteHolder::Mine(1));
        assert_eq!(
            hold_site(s.as_ref(), "S-1", &a, 20).unwrap(),
            SiteHolder::Mine(1),
            "kept, same epoch"
        );
        assert!(matches!(hold_site(s.as_ref(), "S-1", &b, 20).unwrap(), SiteHolder::Other(m) if m.node == "a"));
        assert_eq!(
            site_manager(s.as_ref(), "S-1", 20)
                .unwrap()
                .map(|(o, m)| (o.epoch, m.node)),
            Some((1, "a".into()))
        );
        assert!(holds_site(s.as_ref(), "S-1", &a, 1).unwrap());
        assert!(!holds_site(s.as_ref(), "S-1", &b, 1).unwrap());
        // a's lease lapses: b takes the site, and a no longer holds it.
        assert!(renew(s.as_ref(), &b, 5_000, 900).unwrap());
        assert_eq!(
            site_manager(s.as_ref(), "S-1", 1_500).unwrap(),
            None,
            "its manager is dead"
        );
        assert_eq!(hold_site(s.as_ref(), "S-1", &b, 1_500).unwrap(), SiteHolder::Mine(2));
        assert!(
            !holds_site(s.as_ref(), "S-1", &a, 1).unwrap(),
            "a paused manager finds it lost the site"
        );
        // a comes back as a new incarnation: b keeps the site.
        let a2 = register(s.as_ref(), "a", ("x:1", "x"), 1_000, 2_000).unwrap();
        assert!(matches!(hold_site(s.as_ref(), "S-1", &a2, 2_000).unwrap(), SiteHolder::Other(m) if m.node == "b"));
        // b leaves at shutdown: the site is free at once.
        leave(s.as_ref(), &b).unwrap();
        assert_eq!(hold_site(s.as_ref(), "S-1", &a2, 2_001).unwrap(), SiteHolder::Mine(3));
    }
}
