{{/* Names: <release>-tristage unless the release name already holds the chart's name. */}}
{{- define "tristage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* At most 40 characters: KubeRay appends "-head-svc" and group names to the cluster's name. */}}
{{- define "tristage.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tristage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tristage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tristage.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tristage.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tristage.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tristage.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tristage.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.model.device) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* KubeRay names the head's Service "<RayCluster name>-head-svc". */}}
{{- define "tristage.rayHeadAddress" -}}
{{- printf "%s-head-svc.%s.svc:6379" (include "tristage.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "tristage.apiKeysSecretName" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else if .Values.apiKeys.keys }}
{{- printf "%s-api-keys" (include "tristage.fullname" .) }}
{{- end }}
{{- end }}

{{/* Engine actors a worker group runs: pods times actors per pod. */}}
{{- define "tristage.groupWorkers" -}}
{{- $group := index .Values.ray.workerGroups .role }}
{{- if $group.enabled }}{{ mul $group.replicas $group.workersPerPod }}{{ else }}0{{ end }}
{{- end }}

{{/* The pool flags of `tristage serve`, checked against the mode. */}}
{{- define "tristage.poolArgs" -}}
{{- $groups := .Values.ray.workerGroups }}
{{- if eq .Values.mode "colocated" }}
{{- if not $groups.colocated.enabled }}
{{- fail "mode colocated needs ray.workerGroups.colocated.enabled" }}
{{- end }}
- --mode
- colocated
- --replicas
- {{ include "tristage.groupWorkers" (dict "Values" .Values "role" "colocated") | quote }}
{{- else }}
{{- if not (and $groups.prefill.enabled $groups.decode.enabled) }}
{{- fail "mode disaggregated needs ray.workerGroups.prefill.enabled and ray.workerGroups.decode.enabled" }}
{{- end }}
- --mode
- disaggregated
{{- range $role := list "encode" "prefill" "decode" }}
{{- if (index $groups $role).enabled }}
- --{{ $role }}
- {{ include "tristage.groupWorkers" (dict "Values" $.Values "role" $role) | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The model volume, when one is configured. */}}
{{- define "tristage.modelVolume" -}}
{{- if .Values.model.volume }}
- name: model
{{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- end }}

{{- define "tristage.modelVolumeMount" -}}
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The Hub cache as HF_HOME, and the token, for a container that resolves model.id (the gateway, Ray workers). */}}
{{- define "tristage.hubEnv" -}}
{{- if .Values.model.id }}
- {name: HF_HOME, value: {{ .Values.model.hubCache.mountPath | quote }}}
{{- if .Values.model.hubCache.offline }}
- {name: HF_HUB_OFFLINE, value: "1"}
{{- end }}
{{- if .Values.model.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.model.hfToken.existingSecret }}
      key: {{ .Values.model.hfToken.existingSecretKey }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tristage.hubCacheVolume" -}}
{{- if .Values.model.id }}
- name: hf-cache
{{- if .Values.model.hubCache.existingClaim }}
  persistentVolumeClaim: {claimName: {{ .Values.model.hubCache.existingClaim | quote }}}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- end }}

{{- define "tristage.hubCacheVolumeMount" -}}
{{- if .Values.model.id }}
- {name: hf-cache, mountPath: {{ .Values.model.hubCache.mountPath | quote }}}
{{- end }}
{{- end }}

{{/* The Secret holding Ray's auth token. */}}
{{- define "tristage.rayAuthSecretName" -}}
{{- .Values.ray.authToken.existingSecret | default (printf "%s-ray-auth" (include "tristage.fullname" .)) -}}
{{- end }}

{{/* Ray token authentication for a container running any Ray process. */}}
{{- define "tristage.rayAuthEnv" -}}
- {name: RAY_AUTH_MODE, value: token}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tristage.rayAuthSecretName" . }}
      key: {{ if .Values.ray.authToken.existingSecret }}{{ .Values.ray.authToken.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{- define "tristage.clusterSecretName" -}}
{{- .Values.dataPlane.clusterSecret.existingSecret | default (printf "%s-cluster-secret" (include "tristage.fullname" .)) -}}
{{- end }}

{{/* The data plane's cluster secret for a container running `tristage serve` (none with auth off). */}}
{{- define "tristage.clusterSecretEnv" -}}
{{- if ne .Values.dataPlane.auth "off" }}
- name: TRISTAGE_CLUSTER_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "tristage.clusterSecretName" . }}
      key: {{ if .Values.dataPlane.clusterSecret.existingSecret }}{{ .Values.dataPlane.clusterSecret.existingSecretKey }}{{ else }}cluster-secret{{ end }}
{{- end }}
{{- end }}
