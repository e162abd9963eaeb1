-- The fence of a lease is its holder, its expiry and the row's write_seq at
-- the claim (leased_seq); the writeback, the failure report and the
-- heartbeat check all three. lease_epoch was bumped by every lease and read
-- by nothing, so it goes: one column less written by every claim.
ALTER TABLE work_items DROP COLUMN lease_epoch;
