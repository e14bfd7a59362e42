-- Delete the lease of an instance and take back its tasks. ARGV: prefix, instance, now.
-- Reply: {released, requeued, interrupted}.

redis.call('ZREM', LEASES, ARGV[2])
return take_back_owners({ARGV[2]}, ARGV[3])
