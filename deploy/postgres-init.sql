-- One database per Kinshasa component (component autonomy), on the compose file's PostgreSQL.
CREATE DATABASE kinshasa_gateway;
CREATE DATABASE kinshasa_coordinator;
CREATE DATABASE kinshasa_documents;
CREATE DATABASE kinshasa_ledger;
CREATE DATABASE kinshasa_links;
CREATE DATABASE kinshasa_notifier;
