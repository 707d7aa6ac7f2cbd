-- Tokens of a user issued (iat) before this instant are void: set with every
-- ban, unban, role change, password change. NULL: none revoked. Deleted
-- users need no marker; their row is gone, and with it every token's worth.
ALTER TABLE users ADD COLUMN tokens_valid_from TIMESTAMPTZ;
