-- Which VM holds which network lease index (package network's
-- Allocations): the index picks the VM's /30, TAP name and MAC, so two
-- VMs must never share one, across every hyphae process using this home.
-- No foreign key to vms: a lease is taken before the VM row exists and
-- network.Manager.Reclaim removes leases whose VM is gone.
CREATE TABLE net_allocations (
    vm_id       TEXT PRIMARY KEY CHECK (length(vm_id) > 0),
    idx         INTEGER NOT NULL UNIQUE CHECK (idx >= 0),
    created_at  TEXT NOT NULL
);
